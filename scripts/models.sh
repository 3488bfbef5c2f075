# Real models for kiln's serving tests and benchmarks, made by the real exporters
# (torch, transformers, scikit-learn through skl2onnx) and cached by the versions
# that made them. Sourced after scripts/env.sh, not run:
#
#   source scripts/env.sh
#   source scripts/models.sh
#   dir="$(kiln_exported_models)"   # empty when the models cannot be made
#   [ -n "$dir" ] && ls "$dir"      # resnet18.onnx, bert.onnx, ..., manifest.json
#
# scripts/export_models.py says what each model is.

# The exporters venv's pins, all exact (torch's pure-Python dependencies too, so
# the venv is the same wherever it is made). PyPI's Linux torch brings its CUDA
# wheels (some 4 GB); exporting runs on the CPU, and the venv is made once.
KILN_EXPORTERS_PINS="torch==2.15.0 torchvision==0.29.2 transformers==5.25.0 onnx==1.23.2 onnxruntime==1.32.0 scikit-learn==1.9.1 skl2onnx==1.20.0 numpy==2.4.6 filelock==4.3.2 typing-extensions==4.16.0 setuptools==84.2.1 sympy==1.14.0 mpmath==1.3.0 networkx==3.6.1 jinja2==3.1.6 markupsafe==3.0.4 fsspec==2026.9.0 pillow==13.0.0"

# Prints the python of a virtual environment with the model exporters, installed
# once from PyPI under the target directory (about 2 minutes and 6 GB); nothing
# when it cannot be installed.
kiln_exporters_python() {
  kiln_pinned_venv exporters "$KILN_EXPORTERS_PINS"
}

# Prints a directory "$CARGO_TARGET_DIR/models/KEY" holding the models that
# scripts/export_models.py makes (and its manifest.json), KEY being a hash of the
# exporters' pins and of that script. The models are exported once, into a
# temporary directory renamed into place when complete; a cached directory is
# used without the venv. Prints nothing when they cannot be made.
kiln_exported_models() {
  local script="$KILN_ROOT/scripts/export_models.py"
  local key
  key="$( { echo "$KILN_EXPORTERS_PINS"; sha256sum <"$script"; } | sha256sum | cut -c1-16)" || return 0
  local root="$CARGO_TARGET_DIR/models"
  local dir="$root/$key"
  local done_marker="$dir/kiln-export.done"
  if [ ! -f "$done_marker" ]; then
    mkdir -p "$root" 2>/dev/null || return 0
    local py
    py="$(kiln_exporters_python)"
    [ -n "$py" ] || return 0
    (
      flock -w 1800 9 || exit 0
      [ -f "$done_marker" ] && exit 0
      tmp="$(mktemp -d "$root/.export-$key.XXXXXX")" && chmod 755 "$tmp" || exit 0
      if "$py" "$script" "$tmp" >&2; then
        echo "$KILN_EXPORTERS_PINS" >"$tmp/kiln-export.done"
        rm -rf "$dir"
        mv -T "$tmp" "$dir" || rm -rf "$tmp"
      else
        rm -rf "$tmp"
      fi
    ) 9>"$root/.lock" || true
  fi
  if [ -f "$done_marker" ]; then
    echo "$dir"
  fi
}
