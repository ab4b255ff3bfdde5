#!/usr/bin/env bash
# System packages tinyldm needs: Tesseract (OCR), the DejaVu fonts (built-in data) and the
# PostgreSQL server programs (tests/e2e/test_infra.py starts a throwaway server on 127.0.0.1;
# the pipeline itself never needs one). Installs them with apt when running as root;
# otherwise says what to install.
set -euo pipefail
need=()
command -v tesseract >/dev/null 2>&1 || need+=(tesseract-ocr)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf ] || need+=(fonts-dejavu-core)
# Debian keeps initdb/postgres off PATH, in /usr/lib/postgresql/<major>/bin
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
  || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "tinyldm needs ${need[*]}: install them (e.g. sudo apt-get install ${need[*]}; macOS: brew install tesseract postgresql) and run make again" >&2
  exit 1
fi
