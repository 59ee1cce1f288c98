# Two entry points, as the README says:  make demo   and   make test
# Both create .venv with a CPU build of PyTorch pinned (users with a GPU can
# `make demo TORCH_SPEC=` to keep the torch already in their environment).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/selfmask demo

# one torch thread unless OMP_NUM_THREADS says otherwise: the tests' models are tiny, and on a
# machine shared with other jobs two threads were 7.5-11x slower than one (docs/scale.md)
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
