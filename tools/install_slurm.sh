#!/usr/bin/env bash
# Install what the real-Slurm tests need (tests/slurm_cluster.py): Debian 12's Slurm 22.05 controller,
# node daemon, client commands, munge, and slurmdbd + MariaDB for `sacct`. Called by `make test`.
#
# - Everything present: returns at once (no apt call).
# - Root: `apt-get update` once, then install, pinned to Debian 12's series (Slurm 22.05.8, munge 0.5.15,
#   MariaDB 10.11). No service is started: the tests run their own private daemons.
# - Not root: installs nothing and says so; the Slurm tests then skip naming what is missing
#   (under CI=true they fail instead).
set -euo pipefail

# binary -> Debian package (a package is installed when its binary is missing)
declare -A NEEDED=(
  [slurmctld]=slurmctld [slurmd]=slurmd [sbatch]=slurm-client [munged]=munge
  [slurmdbd]=slurmdbd [mariadbd]=mariadb-server
)
# Debian 12 (bookworm) versions; the glob keeps security updates of the same release installable
declare -A PIN=(
  [slurmctld]='22.05.8*' [slurmd]='22.05.8*' [slurm-client]='22.05.8*' [munge]='0.5.15*'
  [slurmdbd]='22.05.8*' [mariadb-server]='1:10.11.*'
)

missing=()
for binary in "${!NEEDED[@]}"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null || missing+=("${NEEDED[$binary]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install_slurm.sh: not root, not installing ${missing[*]}; the real-Slurm tests will skip" \
       "(as root: make test, or apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server)" >&2
  exit 0
fi

specs=()
for pkg in "${missing[@]}"; do
  specs+=("$pkg=${PIN[$pkg]}")
done
# apt must not start the packaged services (no systemd here; the tests run private daemons): a
# policy-rc.d that refuses every start, unless the image already has one
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  own_policy=1
fi
trap 'if [ $own_policy = 1 ]; then rm -f "$policy"; fi' EXIT
echo "install_slurm.sh: installing ${specs[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${specs[@]}" >/dev/null
