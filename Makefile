# Two commands on a fresh machine: `make book` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
READY  := $(VENV)/.ready
# nbval's options: the notebooks run in this venv's kernel, with machine-specific text sanitized.
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: book test unit notebooks pages execute clean perturbed

# Matplotlib's font cache in this venv, built once at set-up: the user-wide cache can list the fonts
# of another matplotlib installation, and one whose fonts are gone (a deleted venv) makes every
# first plot of a notebook warn "findfont: ... not found" on stderr, which nbval compares.
export MPLCONFIGDIR := $(CURDIR)/$(VENV)/matplotlib

# Re-install only when the pins or the package metadata change. pip compiles what it installs to
# bytecode on one core (a third of the set-up, torch is large); compileall does it on every core.
# Like pip, it skips the files that do not compile here (torch ships one in Python 3.12 syntax),
# but it says so in its exit status, which is ignored.
$(READY): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-compile --no-deps --no-build-isolation -e .
	$(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	$(BIN)/python -c "import matplotlib.font_manager"
	touch $(READY)

# The HTML book in _build/html, from the outputs stored in the notebooks; any warning fails it.
book: $(READY)
	$(BIN)/jupyter-book build . --all --warningiserror --keep-going

# Two pytest workers of one thread each keep both cores busy (compiling, small tensors) without
# the two fighting over threads. Each run lists its 15 slowest tests (or notebook cells): where
# make test's time budget goes.
XDIST  := -n 2 --dist loadscope --durations=15
unit: $(READY)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(XDIST) tests

# The stored outputs were made on the CPU; a GPU sums in another order and can change a last digit,
# so nbval hides any GPU (the CUDA path is covered by the unit tests and by readers' runs).
notebooks: $(READY)
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(XDIST) $(NBVAL) chapters

# Outputs must hold on every machine, not only on the one that stored them. Each perturbation below
# changes the last bits of torch's results the way another CPU, thread count or kernel would; under
# each, every notebook and every test that compares stored numbers (marker `numerics`) must pass.
#   ulp      flips the last bit of every product, reduction and transcendental result
#            (tests/perturb/sitecustomize.py): the strongest, and the same on every machine
#   scalar   ATen's kernels without vector instructions (other reduction order, other exp/log)
#   avx2     ATen's AVX2 kernels (this machine's default may be AVX-512)
#   mkl      MKL's conditional-numerical-reproducibility path for matrix products
#   threads  three threads per process: parallel reductions split differently
# `make perturbed` runs them all; `make test` runs `ulp`. `make perturbed-scalar` runs one.
PERTURBATIONS   := ulp scalar avx2 mkl threads
perturb.ulp     := OPTLIB_PERTURB=ulp PYTHONPATH=$(CURDIR)/tests/perturb
perturb.scalar  := ATEN_CPU_CAPABILITY=default
perturb.avx2    := ATEN_CPU_CAPABILITY=avx2
perturb.mkl     := MKL_CBWR=COMPATIBLE
perturb.threads := OMP_NUM_THREADS=3
perturbed: $(addprefix perturbed-,$(PERTURBATIONS))
# The perturbations that change the instruction set or the threads compile into an inductor cache of
# their own: inductor's cache does not tell ATEN_CPU_CAPABILITY apart, and a kernel cached under one
# instruction set fails to build under another. `ulp` and `mkl` share the unperturbed cache, so that
# `make test` compiles each kernel once: `ulp` pauses while compiled code runs, and MKL is called by
# compiled code at run time, never compiled into it.
PERTURBED_CACHE := $(or $(TMPDIR),/tmp)/optlib-inductor
cache.scalar    := TORCHINDUCTOR_CACHE_DIR=$(PERTURBED_CACHE)-scalar
cache.avx2      := TORCHINDUCTOR_CACHE_DIR=$(PERTURBED_CACHE)-avx2
cache.threads   := TORCHINDUCTOR_CACHE_DIR=$(PERTURBED_CACHE)-threads
perturbed-%: $(READY)
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 $(cache.$*) $(perturb.$*) $(BIN)/python -m pytest $(XDIST) -m numerics tests
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 $(cache.$*) $(perturb.$*) $(BIN)/python -m pytest $(XDIST) $(NBVAL) chapters

# The unit tests leave a core idle whenever they wait for the compiler, and the page check mostly
# waits for the browser: the book, its pages and the C++ extension of the ulp perturbation are
# built and checked meanwhile, each target's output printed when it is done.
test: $(READY)
	$(MAKE) --no-print-directory -j3 --output-sync=target unit checked-book perturb-extension
	$(MAKE) --no-print-directory notebooks perturbed-ulp

# The book, then every page in Chromium. The page check needs Debian's Chromium (.ci/run installs
# it); without it this says so and skips only that step.
.PHONY: checked-book
checked-book: $(READY)
	$(MAKE) --no-print-directory book
	@if [ -x $(CHROMIUM) ]; then $(MAKE) --no-print-directory pages SCREENSHOTS=; \
	else echo "make test: $(CHROMIUM) not found, pages not checked (apt-get install chromium)"; fi

# The ulp perturbation's C++ extension, built once per machine into torch's extension cache by
# tests/perturb/sitecustomize.py (which every Python process with that folder on its path runs).
.PHONY: perturb-extension
perturb-extension: $(READY)
	$(perturb.ulp) $(BIN)/python -c pass

# After editing a chapter: re-run notebooks in place so the stored outputs are fresh
# (all of them, or some: `make execute NOTEBOOKS=chapters/sgd.ipynb`). Unlike `jupyter execute`,
# this leaves out per-cell timestamps, which would only be noise in the diffs.
NOTEBOOKS ?= $(wildcard chapters/*.ipynb)
execute: $(READY)
	$(BIN)/python -c 'import sys, nbclient, nbformat; [nbformat.write(nbclient.execute(nbformat.read(p, 4), record_timing=False, cwd="chapters"), p) for p in sys.argv[1:]]' $(NOTEBOOKS)

clean:
	rm -rf _build .pytest_cache

# Every built page in headless Chromium, offline (any request off localhost fails): MathJax typeset, images
# loaded, figures captioned, Colab buttons, no console errors; full-page screenshots, to look at, in
# $(SCREENSHOTS) (`make test` leaves them out: they check nothing and take half the time).
# Needs Debian's Chromium (`apt-get install chromium`, /usr/bin/chromium); Playwright drives it.
# `pages` checks the book as built; `check-pages` builds it first.
CHROMIUM ?= /usr/bin/chromium
SCREENSHOTS ?= _build/screenshots
.PHONY: check-pages
pages: $(READY)
	$(BIN)/python tests/browser/check_pages.py --chromium $(CHROMIUM) $(if $(SCREENSHOTS),--screenshots $(SCREENSHOTS))

check-pages: book pages

# The optimizer study behind chapters/choosing.ipynb (minutes; it prints its time): writes
# optlib/bench/results/study.json, which is committed and installed with the kit.
.PHONY: study
study: $(READY)
	$(BIN)/python -m optlib.bench.study

# The transformer comparisons that the optimizer chapters read (minutes): writes
# optlib/bench/results/lm_study.json, committed and installed with the kit.
.PHONY: lm-study
lm-study: $(READY)
	$(BIN)/python -m optlib.bench.lm_study
