# Shared by the demo scripts (sourced): an SFT warm-up that lasts until it is good enough.
# warm_up OUT METRIC GOAL STEPS STEP MAX_STEPS TRAIN_ARGS...
#   train.py TRAIN_ARGS --num-rollout STEPS, then STEP more steps at a time, each run
#   resuming OUT's last checkpoint (--load), while the last eval METRIC in OUT is below
#   GOAL and fewer than MAX_STEPS were taken. Needs $PYTHON.
warm_up() {
   local out=$1 metric=$2 goal=$3 steps=$4 step=$5 max_steps=$6
   shift 6
   "$PYTHON" train.py "$@" --num-rollout "$steps"
   while awk -v score="$("$PYTHON" -m furlong.output.summary --last "$metric" "$out")" \
             -v goal="$goal" 'BEGIN { exit !(score < goal) }' \
         && (( steps < max_steps )); do
      steps=$((steps + step))
      "$PYTHON" train.py "$@" --num-rollout "$steps" --load "$out"
   done
}

# finish OUT_DIR...: the summary table of the runs and where their reward curves are.
finish() {
   echo
   "$PYTHON" -m furlong.output.summary "$@"
   echo "reward curves:" "${@/%//reward_curve.png}"
}
