#!/usr/bin/env bash
# Install the TA-OPD patch files into an upstream slime checkout.
#   bash tools/install_slime_patch.sh SLIME_DIR [--python PY] [--force] [--dry-run] [--no-verify]
#   bash tools/install_slime_patch.sh SLIME_DIR --uninstall [--force] [--dry-run]
# The work is done by tools/install_slime_patch.py (see docs/slime_patch.md); PYTHON picks the
# interpreter that runs the installer (default python3).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "${HERE}/install_slime_patch.py" "$@"
