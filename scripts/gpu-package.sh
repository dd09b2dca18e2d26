#!/usr/bin/env bash
# Builds what the GPU check carries to a GPU machine that has no Rust and no network: the
# release `moe-serve` and the release `gpu` test binary (tests/gpu.rs), stripped, in one folder
# (default gpu-bundle/, gitignored), with a manifest. scripts/gpu-check.sh runs them there.
#
# Usage: scripts/gpu-package.sh [BUNDLE_DIR]       (from anywhere inside the repository)
#
# What must hold: the bundle is at most MAX_BUNDLE_MIB (the script fails otherwise, naming the
# sizes), and the tree that travels (tracked and untracked-not-ignored files plus the bundle)
# is reported against the 64 MiB a device call carries. The binaries are replaced atomically
# (copied under a temporary name, then renamed), and stale test binaries are removed, so the
# folder never holds a half-written or an old `gpu-*`.
set -euo pipefail

# The bundle's limit: the device call carries at most 64 MiB with the working tree, so the
# binaries must leave room for the tracked tree (~27 MiB today).
MAX_BUNDLE_MIB=60
# What one device call carries in all (working tree, shared/ and carried paths).
CARRY_LIMIT_MIB=64

root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
cd "$root"
bundle=${1:-gpu-bundle}
mkdir -p "$bundle"

echo "gpu-package: building release moe-serve and the gpu test binary (cargo)" >&2
# One cargo invocation builds both: an integration test builds the package's binaries too.
# The JSON messages name the test executable; cargo's human output goes to stderr.
messages=$(mktemp)
trap 'rm -f "$messages"' EXIT
cargo test --release --test gpu --no-run --message-format=json-render-diagnostics >"$messages"
cargo build --release --bin moe-serve --message-format=json-render-diagnostics >>"$messages"

# The last compiler-artifact line of each target names its executable.
artifact() { # $1: target name, $2: "true" for a test build
    jq -r --arg name "$1" --argjson test "$2" '
        select(.reason == "compiler-artifact" and .target.name == $name
               and .profile.test == $test and .executable != null) | .executable' \
        "$messages" | tail -n 1
}
test_bin=$(artifact gpu true)
serve_bin=$(artifact moe-serve false)
for b in "$test_bin" "$serve_bin"; do
    if [[ -z "$b" || ! -x "$b" ]]; then
        echo "gpu-package: cargo named no executable (got '$b'); see the cargo output above" >&2
        exit 1
    fi
done

install_stripped() { # $1: source, $2: destination name in the bundle
    local tmp="$bundle/.$2.tmp-$$"
    cp "$1" "$tmp"
    strip --strip-all "$tmp"
    chmod 755 "$tmp"
    mv -f "$tmp" "$bundle/$2"
}
# Old test binaries (another hash) would make the check's `gpu-*` ambiguous.
find "$bundle" -mindepth 1 -maxdepth 1 -name 'gpu-*' ! -name "$(basename "$test_bin")" -delete
install_stripped "$serve_bin" moe-serve
install_stripped "$test_bin" "$(basename "$test_bin")"

# The manifest: where the test binary was built (its fixtures path is compiled in), the
# revision, and each binary's checksum.
{
    echo "build_root=$root"
    echo "git_rev=$(git rev-parse HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo '+dirty')"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "rustc=$(rustc --version)"
    (cd "$bundle" && sha256sum moe-serve gpu-*)
} >"$bundle/.MANIFEST.tmp-$$"
mv -f "$bundle/.MANIFEST.tmp-$$" "$bundle/MANIFEST"

bundle_bytes=$(du -cb "$bundle"/* | tail -n 1 | cut -f 1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
    du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f 1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
ls -l "$bundle" >&2
echo "gpu-package: bundle $(mib "$bundle_bytes") MiB in $bundle/ (limit $MAX_BUNDLE_MIB MiB)"
echo "gpu-package: tree that travels $(mib "$tree_bytes") MiB + bundle = \
$(mib $((tree_bytes + bundle_bytes))) MiB (a device call carries at most $CARRY_LIMIT_MIB MiB)"
if ((bundle_bytes > MAX_BUNDLE_MIB * 1048576)); then
    echo "gpu-package: the bundle is $(mib "$bundle_bytes") MiB, over $MAX_BUNDLE_MIB MiB;" \
        "build with fewer features or split the check" >&2
    exit 1
fi
if ((tree_bytes + bundle_bytes > CARRY_LIMIT_MIB * 1048576)); then
    echo "gpu-package: warning: tree plus bundle exceed $CARRY_LIMIT_MIB MiB; a device call" \
        "would refuse them (ignore large untracked files first)" >&2
fi
echo "gpu-package: carry it with run(carry=[\"$bundle\"], command=\"bash scripts/gpu-check.sh\")"
