#!/usr/bin/env bash
# Installs the Debian/Ubuntu system parts that resunet's tests start themselves, on loopback:
#   chromium                  headless browser for the web page and PDF report tests
#   orthanc, orthanc-dicomweb a real PACS (DICOMweb + DIMSE) for the PACS bridge tests
#   dcmtk                     storescu/findscu/dcmftest: an independent DICOM sender and checker
#   dicom3tools               dciodvfy: validates every DICOM object resunet writes
#   plastimatch               an independent RTSTRUCT reader (planning-system view of the contours)
#   postgresql                the service's shared job queue (initdb/pg_ctl in a temp folder)
#   openssl                   test certificates for DICOM over TLS
#   mricron-data              Colin27 T1 + brain mask (real data for tests and benches)
#   dcm2niix                  the peer column of bench/io_read_speed.py and bench/io_vs_dcm2niix.py
# Idempotent: packages already present are left alone, and nothing is installed when all are.
# Uses sudo only when not run as root. Called by the README's test command and by .ci/run.
set -euo pipefail

packages=(chromium orthanc orthanc-dicomweb dcmtk dicom3tools plastimatch postgresql openssl mricron-data dcm2niix)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup-system: all system parts present (${packages[*]})"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: apt-get not found; install these by hand: ${missing[*]}" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup-system: run as root or install sudo (needed for: ${missing[*]})" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "setup-system: installing ${missing[*]}"
# Try from the current package lists first; update them only if that fails (a fresh image has none).
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
# Debian starts the packaged Orthanc and PostgreSQL services where an init system runs; the tests
# start their own instances on free ports, so the packaged ones are not needed (and may not run here).
echo "setup-system: done"
