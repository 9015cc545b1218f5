#!/bin/sh
# Build the conveyor image (deploy/Containerfile) with podman: `make image`, or
#   deploy/build-image.sh [NAME:TAG]
#
# No registry serves base images to every build machine, so the base is made here: a Debian
# root file system from debootstrap (minbase with python3, without docs, locales and apt's
# lists), imported once as localhost/conveyor-base:SUITE and kept as a tarball in
# $CONVEYOR_IMAGE_CACHE for the next machine or the next `podman system reset`. The RUN step
# uses chroot isolation, so no OCI runtime has to start a container. Needs root, podman,
# debootstrap, and `python3 -m pip` ($PYTHON) to build and fetch the wheels.
set -eu
image=${1:-conveyor:latest}
root=$(cd "$(dirname "$0")/.." && pwd)
suite=bookworm  # python3 3.11, the oldest Python the project supports; glibc 2.36
glibc_minor=36
base=localhost/conveyor-base:$suite
cache=${CONVEYOR_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor-image}
python=${PYTHON:-python3}

# The Debian archive to take the base from: $DEBIAN_MIRROR, else the one this machine's apt
# uses (a build machine may reach Debian only through its own mirror), else deb.debian.org.
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v '^[[:space:]]*#' \
    | grep -oE '(https?|file)://[^ ]*/debian/?([[:space:]]|$)' | sed 's/[[:space:]]*$//' \
    | head -n 1)
  echo "${found:-http://deb.debian.org/debian}"
}

if ! podman image exists "$base"; then
  tarball=$cache/debian-$suite-python3.tar
  if [ ! -f "$tarball" ]; then
    mkdir -p "$cache"
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    debootstrap --variant=minbase --include=python3 "$suite" "$rootfs" "$(debian_mirror)"
    rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
      "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
  fi
  podman import "$tarball" "$base"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/state"
# The two distributions, and the wheels of all they need at constraints.txt's versions, for
# the image's Python and C library; pip at the version of the one that builds them.
"$python" -m pip wheel --quiet --no-deps -w "$context/wheels" "$root" "$root/service"
pip_version=$("$python" -m pip --version | cut -d' ' -f2)
platforms="--platform manylinux2014_$(uname -m)"  # the C libraries a wheel may need, up to 2.36
for minor in $(seq 17 "$glibc_minor"); do
  platforms="$platforms --platform manylinux_2_${minor}_$(uname -m)"
done
# shellcheck disable=SC2086 # $platforms is a list of options
"$python" -m pip download --quiet --only-binary :all: -d "$context/wheels" \
  --python-version 3.11 --implementation cp $platforms \
  -c "$root/constraints.txt" "pip==$pip_version" \
  "$(ls "$context"/wheels/conveyor-*.whl)[cli]" "$(ls "$context"/wheels/conveyord-*.whl)"
# --layers=false: the install stage (196 MB of wheels and build) is not kept as an image.
podman build --layers=false --isolation "${CONVEYOR_BUILD_ISOLATION:-chroot}" --build-arg "BASE=$base" \
  -f "$root/deploy/Containerfile" -t "$image" "$context"
