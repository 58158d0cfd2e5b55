# make demo: set up .venv and run the embedded demo.  make test: set up .venv and run the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo test
demo: $(VENV)/.installed
	PYTHON=$(PYTHON) scripts/run-tiny-demo.sh runs/demo

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n 3 --dist loadfile

$(VENV)/.installed: pyproject.toml scripts/setup-env.sh
	scripts/setup-env.sh $(VENV)
	touch $@
