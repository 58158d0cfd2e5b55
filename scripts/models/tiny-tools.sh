# MODEL_ARGS of the tiny tool-use model (python -m furlong.tiny OUT --tools): the model of
# tiny.sh with the tool task's vocabulary (37 tokens instead of 22).
source "$(dirname "${BASH_SOURCE[0]}")/tiny.sh"
for i in "${!MODEL_ARGS[@]}"; do
   if [[ ${MODEL_ARGS[i]} == --vocab-size ]]; then MODEL_ARGS[i + 1]=37; fi
done
