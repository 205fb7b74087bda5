# dlnotes — set-up, book, tests. `make book` and `make test` work on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   := data/shapes
NOTEBOOKS := $(sort $(wildcard book/*.ipynb))
# pytest-xdist workers for `make unit` and `make notebooks` (2 suits the 2-core CI machine; JOBS=0 runs
# in one process). A notebook's cells stay together, in order, on one worker (--dist loadscope).
JOBS   ?= 2
# Keep TensorFlow's C++ start-up chatter out of notebook outputs and test logs.
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONHASHSEED ?= 0
# Notebook kernels read book/.ipython (keeps TensorFlow's C++ log lines out of stored outputs).
export IPYTHONDIR := $(CURDIR)/book/.ipython

.PHONY: help install data book check-html test unit notebooks execute bench side-by-side pretrain lint format format-notebooks clean

help:
	@echo "make book       create .venv, install dlnotes, generate the data set, build the HTML book into _build/html"
	@echo "make check-html build the book, open every page in headless Chromium offline; fail on raw TeX,"
	@echo "                broken links/images, error outputs, console errors (screenshots: _build/check-html)"
	@echo "make test       unit tests, then every notebook through nbval"
	@echo "make unit       unit tests only"
	@echo "make notebooks  nbval on the stored notebooks only"
	@echo "make execute    re-run every notebook top to bottom and store its outputs"
	@echo "make bench      run the benchmarks in benchmarks/"
	@echo "make side-by-side  train the five detectors for chapter 8 (about 35 min on 2 cores) into"
	@echo "                $(SIDE_BY_SIDE), which must not hold their files yet"
	@echo "make pretrain   pre-train resnet_tiny on the shapes (about 20 min) into $(SHAPES_WEIGHTS),"
	@echo "                whose file must be moved away first (the shipped file is what weights=\"shapes\" loads)"
	@echo "make lint       ruff check + format check (notebooks: tools/notebook_style.py --check)"
	@echo "make format-notebooks  format notebook code to the text column, NBVAL tags, hide tags"

# The venv is (re)built when pyproject.toml changes; a stamp file records a finished install.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[book,test,dev]"
	touch $@

install: $(VENV)/.installed

# Idempotent: the generator does nothing when the manifest matches and all files exist.
data: install
	$(PY) -m dlnotes.data.shapes --out $(DATA)

book: install data
	$(VENV)/bin/jupyter-book build . --warningiserror --nitpick --keep-going
	@echo "The book is in _build/html/index.html"

# The built book as a reader sees it: tools/check_html.py opens every page of _build/html as a file
# in headless Chromium with all other requests blocked, writes a screenshot per page and a report to
# _build/check-html, and fails on raw TeX, broken local links and images, error outputs and console
# errors. Needs the check extra (Playwright, installed here) and a Chromium: Debian's package
# (apt-get install chromium), found on PATH, or CHROMIUM=/path/to/chrome.
CHROMIUM ?=
check-html: book
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install --quiet -e ".[check]"
	$(PY) tools/check_html.py --html _build/html --out _build/check-html $(if $(CHROMIUM),--chromium $(CHROMIUM))

unit: install data
	$(PY) -m pytest tests -q -n $(JOBS) --durations=15

notebooks: install data
	$(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with book/sanitize.cfg \
		-q -n $(JOBS) --dist loadscope $(NOTEBOOKS)

test: unit notebooks

execute: install data
	for nb in $(NOTEBOOKS); do \
		echo "executing $$nb"; \
		(cd book && ../$(VENV)/bin/jupyter execute --inplace --timeout=1800 \
			--kernel_name=python3 $$(basename $$nb)) || exit 1; \
	done

# Chapter 8 loads the five detectors this trains (weights, learning curves); the script refuses to
# overwrite, so move the old files away first.
SIDE_BY_SIDE := book/side_by_side
side-by-side: install data
	mkdir -p $(SIDE_BY_SIDE)
	$(PY) benchmarks/time_to_ap50.py --model RetinaNet YOLOv3 EfficientDet "Faster R-CNN" Keypoint \
		--save $(SIDE_BY_SIDE) --json $(SIDE_BY_SIDE)/training.json --png benchmarks/time_to_ap50.png
	$(PY) benchmarks/time_to_ap50.py --model RetinaNet --backbone-weights shapes --freeze-backbone \
		--save $(SIDE_BY_SIDE) --json $(SIDE_BY_SIDE)/pretrained.json

# The backbone pre-trained on the shapes that weights="shapes" loads (dlnotes.pretraining: about
# 20 min on 2 cores, its own data set in data/shapes_pretrain); it refuses to overwrite, so move
# the shipped file away first. Other backbones: python -m dlnotes.pretraining --backbone NAME.
SHAPES_WEIGHTS := dlnotes/backbones/shapes_weights
pretrain: install
	$(PY) -m dlnotes.pretraining --backbone resnet_tiny --data data/shapes_pretrain \
		--out $(SHAPES_WEIGHTS)/resnet_tiny.weights.h5

bench: install data
	$(PY) benchmarks/iou_matching.py
	$(PY) benchmarks/yolo_ignore_mask.py
	$(PY) benchmarks/roi_pooling.py --repeats 3
	$(PY) benchmarks/faster_rcnn.py --repeats 3
	$(PY) benchmarks/keypoint.py --repeats 3
	$(PY) benchmarks/cpu_step_time.py
	$(PY) benchmarks/book_times.py
	@$(PY) -c "import keras_hub" 2>/dev/null && $(PY) benchmarks/retinanet_keras_hub.py \
		|| echo "skipped retinanet_keras_hub.py: pip install -e '.[bench]' (keras-hub) to run it"

lint: install
	$(VENV)/bin/ruff check dlnotes tests benchmarks book tools
	$(VENV)/bin/ruff format --check dlnotes tests benchmarks tools
	$(PY) tools/notebook_style.py --check $(NOTEBOOKS)

format: install
	$(VENV)/bin/ruff format dlnotes tests benchmarks tools
	$(VENV)/bin/ruff check --fix dlnotes tests benchmarks tools

# Notebook sources only (outputs are kept): see tools/notebook_style.py for the rules. Re-execute a
# notebook afterwards only if its figure set-up lines changed.
format-notebooks: install
	$(PY) tools/notebook_style.py $(NOTEBOOKS)

clean:
	rm -rf _build
