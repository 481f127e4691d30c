# forage: the two quickstart commands are `make demo` and `make test` (see README.md).
# Both install what is missing (apt), build, and run.

GUEST_TARGET := x86_64-unknown-linux-gnu
GUEST_OUT    := target/guest

.PHONY: demo test deps build guest clean-data

demo: deps build guest
	bash scripts/demo.sh

test: deps guest
	bash scripts/test.sh

deps:
	bash scripts/deps.sh

build:
	cargo build --release --locked -p forage -p forage-shim -p forage-bench

# Static guest binaries (agent, sample app) for the initramfs and app packages, and the
# sample apps built from Debian packages (their .debs are installed by forage, offline).
guest:
	RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
	  cargo build --release --locked --target $(GUEST_TARGET) -p forage-agent -p hashsearch
	mkdir -p $(GUEST_OUT)/apps/hashsearch
	cp target/$(GUEST_TARGET)/release/forage-agent $(GUEST_OUT)/forage-agent
	cp target/$(GUEST_TARGET)/release/hashsearch $(GUEST_OUT)/apps/hashsearch/hashsearch
	cp apps/hashsearch/pkg/app.json $(GUEST_OUT)/apps/hashsearch/app.json
	# The same service linked dynamically (glibc): the sample for `forage app pack`.
	cargo build --release --locked -p hashsearch
	mkdir -p $(GUEST_OUT)/apps/hashsearch-dynamic
	cp target/release/hashsearch $(GUEST_OUT)/apps/hashsearch-dynamic/hashsearch
	# OCR (tesseract) and vision (OpenCV) services: Python from Debian, packages named in
	# app.json; the vision sample photo comes out of python3-skimage (apt-get download).
	mkdir -p $(GUEST_OUT)/apps/ocr/samples $(GUEST_OUT)/apps/vision/samples
	cp apps/ocr/app.json apps/ocr/ocr_server.py $(GUEST_OUT)/apps/ocr/
	cp apps/ocr/samples/hello.png $(GUEST_OUT)/apps/ocr/samples/
	cp apps/vision/app.json apps/vision/vision_server.py $(GUEST_OUT)/apps/vision/
	bash apps/vision/fetch-sample.sh $(GUEST_OUT)/apps/vision/samples $(GUEST_OUT)/.debs
