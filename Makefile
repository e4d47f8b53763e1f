# pcodec — every target sets up what it needs (a virtualenv in .venv) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
KODAK  ?= ../shared/data/kodak
TRAIN  ?= ../shared/data/train
DEMO   := demo-output
PHOTOS := photos-output

.PHONY: help install test demo bench bench-cuts bench-tools bench-speed bench-nesting bench-photos train fuzz lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# compat mode: a plain path entry instead of setuptools' import finder, whose own
	# imports cost ~30 ms of every start-up (info/truncate run in about 0.1 s)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]' \
	  --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install pcodec with its pinned dependencies

test: $(STAMP)  ## run the test suite (what CI runs)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

demo: $(STAMP)  ## encode the bundled sample, decode it at several layers and byte budgets
	mkdir -p $(DEMO)
	$(BIN)/pcodec encode samples/parrots.png -o $(DEMO)/parrots.pcb
	$(BIN)/pcodec info $(DEMO)/parrots.pcb
	for k in 1 2 4 8; do $(BIN)/pcodec decode $(DEMO)/parrots.pcb --layers $$k -o $(DEMO)/parrots.l$$k.png; done
	for n in 1500 4000 10000; do \
	  $(BIN)/pcodec truncate $(DEMO)/parrots.pcb --bytes $$n -o $(DEMO)/parrots.$$n.pcb && \
	  $(BIN)/pcodec decode $(DEMO)/parrots.$$n.pcb -o $(DEMO)/parrots.b$$n.png; done
	@echo "demo outputs in $(DEMO)/"

bench-tools:  ## install the peer codecs from Debian packages (needs root)
	apt-get update -qq && apt-get install -y -qq libopenjp2-tools libjxl-tools webp libavif-bin ffmpeg

bench: $(STAMP)  ## RD + speed of pcodec and the peers on Kodak -> bench-output/
	$(BIN)/pcodec bench $(KODAK) -o bench-output

bench-cuts: $(STAMP)  ## pcodec alone, 120 byte cuts per Kodak stream -> bench-cuts-output/
	$(BIN)/pcodec bench $(KODAK) --codec pcodec --cuts 120 -o bench-cuts-output

bench-speed: $(STAMP)  ## stage times, images/s, start-up and 4K peak memory beside OpenJPEG
	$(BIN)/pcodec bench --speed $(KODAK) -o bench-output

bench-nesting: $(STAMP)  ## what the nested quantizer costs vs a plain one, and the transforms' ceiling
	$(BIN)/pcodec bench --nesting $(KODAK) -o bench-output

# Photos outside the training set and Kodak, which no model choice here looked at: the four
# colour photographs scikit-image 0.26.0 ships, taken from its wheel on PyPI, checked by hash.
$(PHOTOS)/images/.ok: | $(STAMP)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --dest $(PHOTOS) \
	  scikit-image==0.26.0 --only-binary :all: --platform manylinux_2_28_x86_64 --python-version 3.11
	$(BIN)/python tests/photos.py $(PHOTOS)/scikit_image-0.26.0-*.whl $(PHOTOS)/images
	touch $@

bench-photos: $(STAMP) $(PHOTOS)/images/.ok  ## RD on 4 photos nobody tuned to (scikit-image's)
	$(BIN)/pcodec bench $(PHOTOS)/images -o $(PHOTOS)

train: $(STAMP)  ## train (resumes from ~/.cache/pcodec/runs/hp128) with Kodak evaluation
	$(BIN)/pcodec train --config hp128 --data $(TRAIN) --kodak $(KODAK)

fuzz: $(STAMP)  ## long decoder fuzz run (100 000 mutated streams)
	OMP_NUM_THREADS=1 $(BIN)/python tests/fuzzing.py --cases 100000

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check pcodec tests

clean:  ## remove outputs (keeps .venv)
	rm -rf $(DEMO) .pytest_cache bench-output bench-cuts-output $(PHOTOS)
