#!/usr/bin/env bash
# Build what a local single-node Kubernetes needs, once, into a cache outside the repository:
#   bin/ kube-apiserver kube-controller-manager kube-scheduler kubelet (1.20.2, from Debian's
#        `kubernetes` source package with Debian's Go), kubectl (Debian's kubernetes-client)
#   images/ pause.tar (build/pause/linux/pause.c, gcc -static), busybox.tar (busybox-static),
#        both docker-archives that `ctr images import` takes (no registry is reachable here)
# containerd, runc and the reference CNI plugins come from Debian packages.
#
# Idempotent: every step is skipped when its output exists; the Go build cache lives in the
# cache too (Kubernetes' make keeps it in src/kubernetes-*/_output/local/go/cache), so a
# rebuild after `rm bin/kubelet` only relinks. Log: $CACHE/build.log.
# Usage: k8s/build.sh            (PYLIUM_K8S_CACHE overrides /var/cache/pylium-k8s)
set -euo pipefail

CACHE=${PYLIUM_K8S_CACHE:-/var/cache/pylium-k8s}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=1.20.2
WHAT="cmd/kube-apiserver cmd/kubelet cmd/kube-controller-manager cmd/kube-scheduler"
APT_PACKAGES="golang-go jq rsync golang-github-modern-go-reflect2-dev busybox-static containerd runc
containernetworking-plugins gcc libc6-dev dpkg-dev"

mkdir -p "$CACHE"/{bin,images,src,apt/lists/partial,apt/cache/archives/partial}
# the docker-archive writer of the Kubernetes plugin (standard library only: no venv needed)
ARCHIVE="$HERE/../plugins/orchestrator_k8s/pylium_orchestrator_k8s/dockerarchive.py"
LOG="$CACHE/build.log"
# everything below goes to the log and to the caller's stdout
exec > >(tee -a "$LOG") 2>&1
step() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
step "pylium k8s build into $CACHE"

# Without --no-lock, concurrent runs would build the same tree twice.
exec 9>"$CACHE/.lock"
flock -n 9 || { step "another build holds $CACHE/.lock; waiting"; flock 9; }

missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    step "apt install:$missing"
    apt-get -o DPkg::Lock::Timeout=600 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends $missing
fi

# A private apt state with only deb-src lines mirroring the machine's deb sources: the host's
# apt configuration stays untouched.
APT_OPTS=(-o Dir::Etc::sourcelist="$CACHE/apt/sources.list" -o Dir::Etc::sourceparts=-
          -o Dir::State::Lists="$CACHE/apt/lists" -o Dir::Cache="$CACHE/apt/cache"
          -o DPkg::Lock::Timeout=600)
SRC="$CACHE/src/kubernetes-$K8S_VERSION"
if [ ! -f "$SRC/.unpacked" ]; then
    step "fetching Debian's kubernetes source package"
    : > "$CACHE/apt/sources.list"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        case "$f" in
        *.sources)
            # deb822: keep stanzas of Types: deb on debian.org, emit one-line deb-src entries
            awk '/^Types:/{t=$0} /^URIs:/{u=$2} /^Suites:/{s=$0; sub(/^Suites: */,"",s)}
                 /^Components:/{c=$0; sub(/^Components: */,"",c)}
                 /^$/{if (t ~ /deb/ && u ~ /debian\.org/) {n=split(s,a," "); for(i=1;i<=n;i++) print "deb-src " u " " a[i] " " c}; t=u=s=c=""}
                 END{if (t ~ /deb/ && u ~ /debian\.org/) {n=split(s,a," "); for(i=1;i<=n;i++) print "deb-src " u " " a[i] " " c}}' \
                "$f" >> "$CACHE/apt/sources.list" ;;
        *) sed -n 's/^deb \(.*debian\.org.*\)/deb-src \1/p' "$f" >> "$CACHE/apt/sources.list" ;;
        esac
    done
    cat "$CACHE/apt/sources.list"
    apt-get "${APT_OPTS[@]}" update -q
    rm -rf "$CACHE/src/unpack" && mkdir -p "$CACHE/src/unpack"
    (cd "$CACHE/src/unpack" && apt-get "${APT_OPTS[@]}" source -q "kubernetes")
    dir=$(find "$CACHE/src/unpack" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)
    grep -q "gitVersion.*v$K8S_VERSION\|$K8S_VERSION" "$dir/debian/changelog" \
        || { step "unexpected kubernetes source version in $dir"; exit 1; }
    rm -rf "$SRC" && mv "$dir" "$SRC"
    # Debian's Go (1.19) needs Debian's reflect2, not the vendored 1.0.1 copy
    rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$SRC/vendor/github.com/modern-go/reflect2"
    rm -f "$SRC/vendor/github.com/modern-go/reflect2/go.mod"
    rm -rf "$CACHE/src/unpack"
    touch "$SRC/.unpacked"
fi

need_build=""
for w in $WHAT; do [ -x "$CACHE/bin/$(basename "$w")" ] || need_build=1; done
if [ -n "$need_build" ]; then
    step "go build ($WHAT) at nice 19; Go build cache $SRC/_output/local/go/cache"
    start=$(date +%s)
    (cd "$SRC" && env GOFLAGS=-mod=vendor GO111MODULE=on \
        KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 \
        KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian \
        nice -n 19 make WHAT="$WHAT")
    for w in $WHAT; do install -m 0755 "$SRC/_output/bin/$(basename "$w")" "$CACHE/bin/"; done
    step "go build done in $(( $(date +%s) - start )) s"
fi

if [ ! -x "$CACHE/bin/kubectl" ]; then
    step "kubectl from Debian's kubernetes-client (another kubectl may own /usr/bin/kubectl)"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get -o DPkg::Lock::Timeout=600 download -q kubernetes-client \
        && dpkg-deb -x kubernetes-client_*.deb x)
    install -m 0755 "$tmp/x/usr/bin/kubectl" "$CACHE/bin/kubectl"
    rm -rf "$tmp"
fi

if [ ! -f "$CACHE/images/pause.tar" ]; then
    step "pause image from $SRC/build/pause/linux/pause.c"
    tmp=$(mktemp -d)
    mkdir -p "$tmp/root"
    gcc -Os -Wall -Werror -static -DVERSION=v3.4.1-pylium \
        -o "$tmp/root/pause" "$SRC/build/pause/linux/pause.c"
    strip "$tmp/root/pause"
    /usr/bin/python3 "$ARCHIVE" --name registry.local/pause:3.4.1 --entrypoint /pause \
        --root "$tmp/root" --out "$CACHE/images/pause.tar.new"
    mv "$CACHE/images/pause.tar.new" "$CACHE/images/pause.tar"
    rm -rf "$tmp"
fi

if [ ! -f "$CACHE/images/busybox.tar" ]; then
    step "busybox image from Debian's busybox-static"
    tmp=$(mktemp -d)
    mkdir -p "$tmp/root"/{bin,tmp,etc,proc,sys,dev,www}
    cp /bin/busybox "$tmp/root/bin/busybox"
    for applet in sh ls cat echo sleep ip ping wget nc httpd hostname ifconfig route id; do
        ln -s busybox "$tmp/root/bin/$applet"
    done
    echo 'root:x:0:0:root:/:/bin/sh' > "$tmp/root/etc/passwd"
    echo 'root:x:0:' > "$tmp/root/etc/group"
    echo 'pylium' > "$tmp/root/www/index.html"
    /usr/bin/python3 "$ARCHIVE" --name registry.local/busybox:pylium --entrypoint /bin/sh \
        --root "$tmp/root" --out "$CACHE/images/busybox.tar.new"
    mv "$CACHE/images/busybox.tar.new" "$CACHE/images/busybox.tar"
    rm -rf "$tmp"
fi

echo "v$K8S_VERSION" > "$CACHE/VERSION"
step "ready: $(ls "$CACHE/bin" | tr '\n' ' ')$(ls "$CACHE/images" | tr '\n' ' ')"
