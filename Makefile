# pcodec — every target sets up what it needs on a fresh machine: .venv-run (the codec alone,
# CPU torch, no compressai: what `make demo` uses) and .venv (with training and test tools).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
RUN_VENV  := .venv-run
RUN_BIN   := $(RUN_VENV)/bin
RUN_STAMP := $(RUN_VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The CPU build of torch (about 0.9 GB installed, against 5.5 GB for the CUDA build that
# plain `pip install torch` picks on Linux x86-64).
CPU_TORCH ?= torch==2.13.0
# Where the benchmarks and training find their images (any folder of PNG/JPEG files):
# `make bench KODAK=~/kodak`, `make train TRAIN=~/photos`.
KODAK  ?= ../shared/data/kodak
TRAIN  ?= ../shared/data/train
# Steps of encode-time refinement for pcodec's streams in the RD benchmarks (`make bench REFINE=40`).
REFINE ?= 0
NEED_KODAK = @test -d $(KODAK) || { echo "make: no benchmark images in KODAK=$(KODAK): \
  set KODAK=DIR to a folder of images (the 24 Kodak PNGs for the README's figures)"; exit 2; }
DEMO   := demo-output
PHOTOS := photos-output

.PHONY: help install install-run test demo bench bench-cuts bench-tools bench-speed bench-nesting bench-photos train gpu-bundle fuzz lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# compat mode: a plain path entry instead of setuptools' import finder, whose own
	# imports cost ~30 ms of every start-up (info/truncate run in about 0.1 s)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[train,dev]' \
	  --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_BIN)/pip install --quiet --disable-pip-version-check '$(CPU_TORCH)'
	$(RUN_BIN)/pip install --quiet --disable-pip-version-check -e . \
	  --config-settings editable_mode=compat
	rm -f $(RUN_VENV)/.installed-*
	touch $(RUN_STAMP)
	@du -sh $(RUN_VENV)

install-run: $(RUN_STAMP)  ## create .venv-run: the codec alone, CPU torch (what `make demo` uses)

install: $(STAMP)  ## create .venv: pcodec with training, benchmark and test tools

test: $(STAMP)  ## run the test suite (what CI runs)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

demo: $(RUN_STAMP)  ## encode the bundled sample, decode it at several layers and byte budgets
	mkdir -p $(DEMO)
	$(RUN_BIN)/pcodec encode -f samples/parrots.png -o $(DEMO)/parrots.pcb
	$(RUN_BIN)/pcodec info $(DEMO)/parrots.pcb
	for k in 1 2 4 8; do $(RUN_BIN)/pcodec decode -f $(DEMO)/parrots.pcb --layers $$k -o $(DEMO)/parrots.l$$k.png; done
	for n in 1500 4000 10000; do \
	  $(RUN_BIN)/pcodec truncate -f $(DEMO)/parrots.pcb --bytes $$n -o $(DEMO)/parrots.$$n.pcb && \
	  $(RUN_BIN)/pcodec decode -f $(DEMO)/parrots.$$n.pcb -o $(DEMO)/parrots.b$$n.png; done
	@echo "demo outputs in $(DEMO)/"

bench-tools:  ## install the peer codecs from Debian packages (needs root)
	apt-get update -qq && apt-get install -y -qq libopenjp2-tools libjxl-tools webp libavif-bin ffmpeg

bench: $(STAMP)  ## RD + speed of pcodec and the peers on Kodak -> bench-output/
	$(NEED_KODAK)
	$(BIN)/pcodec bench $(KODAK) --refine $(REFINE) -o bench-output

bench-cuts: $(STAMP)  ## pcodec alone, 120 byte cuts per Kodak stream -> bench-cuts-output/
	$(NEED_KODAK)
	$(BIN)/pcodec bench $(KODAK) --codec pcodec --cuts 120 -o bench-cuts-output

bench-speed: $(STAMP)  ## stage times, images/s, start-up and 4K peak memory beside OpenJPEG
	$(NEED_KODAK)
	$(BIN)/pcodec bench --speed $(KODAK) --limit 24 -o bench-output

# A GPU machine gets a copy of this tree (64 MiB in all, the weights in models/ included) and
# no network: the wheels its image lacks (CPython 3.12) and the photos packed into GPU_DATA_MB.
GPU_BUNDLE  := .gpu
GPU_DATA_MB ?= 18
GPU_WHEEL = $(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp -d $(GPU_BUNDLE)/wheels

gpu-bundle: $(STAMP)  ## wheels and packed photos for a GPU training chunk -> .gpu/ (docs/pu320.md)
	rm -rf $(GPU_BUNDLE)
	$(GPU_WHEEL) --platform manylinux_2_34_x86_64 compressai==1.2.8
	$(GPU_WHEEL) --platform manylinux_2_17_x86_64 constriction==0.5.0
	$(BIN)/python -m pcodec.bundle $(TRAIN) $(GPU_BUNDLE)/train --megabytes $(GPU_DATA_MB)
	@echo "travels: $$(( ($$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + \
	  $$(du -sb $(GPU_BUNDLE) | cut -f1)) / 1048576 )) MiB of 64"

bench-nesting: $(STAMP)  ## what the nested quantizer costs vs a plain one, and the transforms' ceiling
	$(NEED_KODAK)
	$(BIN)/pcodec bench --nesting $(KODAK) -o bench-output

# Photos outside the training set and Kodak, which no model choice here looked at: the four
# colour photographs scikit-image 0.26.0 ships, taken from its wheel on PyPI, checked by hash.
$(PHOTOS)/images/.ok: | $(STAMP)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --dest $(PHOTOS) \
	  scikit-image==0.26.0 --only-binary :all: --platform manylinux_2_28_x86_64 --python-version 3.11
	$(BIN)/python tests/photos.py $(PHOTOS)/scikit_image-0.26.0-*.whl $(PHOTOS)/images
	touch $@

bench-photos: $(STAMP) $(PHOTOS)/images/.ok  ## RD on 4 photos nobody tuned to (scikit-image's)
	$(BIN)/pcodec bench $(PHOTOS)/images --refine $(REFINE) -o $(PHOTOS)

train: $(STAMP)  ## train the default's recipe (resumes from ~/.cache/pcodec/runs/gdn320) with Kodak evaluation
	@test -d $(TRAIN) || { echo "make: no training photos in TRAIN=$(TRAIN): set TRAIN=DIR"; exit 2; }
	$(NEED_KODAK)
	$(BIN)/pcodec train --config gdn320 --data $(TRAIN) --kodak $(KODAK)

fuzz: $(STAMP)  ## long decoder fuzz run (100 000 mutated streams)
	OMP_NUM_THREADS=1 $(BIN)/python tests/fuzzing.py --cases 100000

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check pcodec tests

clean:  ## remove outputs (keeps the virtualenvs)
	rm -rf $(DEMO) .pytest_cache bench-output bench-cuts-output $(PHOTOS)
