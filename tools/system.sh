#!/usr/bin/env bash
# The system packages the book uses beyond Python, installed when the machine lets us:
#   chromium               the browser test opens every page (tests/platform/test_site.py)
#   dataset-fashion-mnist  Fashion-MNIST for the CNN chapters (dlabc.data)
#   npm                    installs MathJax once, for offline math
# With apt and root (or password-less sudo) they are installed; otherwise nothing is
# installed and this says what happens instead: Fashion-MNIST is downloaded into
# ~/.cache/dlabc on first use (checked against its published checksums), the browser test is
# skipped with a loud reason (it fails under CI), and npm must come from nodejs.org.
# Idempotent and quick when everything is there; `make book` and `make test` run it.
set -u
missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have chromium || have chromium-browser || have google-chrome || [ -n "${CHROMIUM:-}" ] || missing+=(chromium)
[ -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || missing+=(dataset-fashion-mnist)
have npm || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if have sudo && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
fi
if have apt-get && [ "$sudo" != none ] && [ "${DLABC_NO_APT:-}" != 1 ]; then
  echo "Installing system packages: ${missing[*]}"
  $sudo apt-get update -qq || true
  if DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    exit 0
  fi
  echo "apt-get could not install ${missing[*]}; going on without them." >&2
fi

for package in "${missing[@]}"; do
  case $package in
    dataset-fashion-mnist)
      echo "NOTE: Fashion-MNIST is not installed: the CNN chapters download it (30 MB, checksummed)" \
           "into ${DLABC_DATA:-~/.cache/dlabc} on first use. Offline? Install it: sudo apt-get install dataset-fashion-mnist" ;;
    chromium)
      echo "NOTE: Chromium is not installed: the browser test will be skipped (set CHROMIUM=/path/to/chrome," \
           "or sudo apt-get install chromium)." ;;
    npm)
      if [ ! -e "${VENV:-.venv}/mathjax/static/mathjax/tex-chtml.js" ]; then
        echo "ERROR: npm is needed once, to install MathJax for offline math: install Node.js" \
             "(sudo apt-get install npm, or https://nodejs.org)." >&2
        exit 1
      fi ;;
  esac
done
exit 0
