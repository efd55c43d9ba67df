#!/usr/bin/env bash
# SwiftPM does not recompile a Swift target when a header of a C module it imports changes: editing
# include/nptkit.h (reached by CNPTKit through a symlink) and then `swift build` leaves the plugins'
# objects as they were, and a plugin built against the older header fills the ops members a newer one
# added with stack garbage (seen: libnptkit-kvm.so's vm_lock_turn after ABI 1.5, a crash when the core
# called it). A real file in the C target's include directory is not tracked either (tried).
# So: when the content of the package's C headers differs from what the last build here saw, every
# Swift file of the package is touched, and the next build (any scratch path) recompiles it all.
# Called by scripts/test.sh, sanitize.sh and fuzz.sh before they build.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.build/nptkit-c-headers.sha256
sum="$(find include Sources Plugins -name '*.h' -print0 | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$sum" ]; then
    echo "== the C headers changed since the last build here: every Swift file touched (SwiftPM does not see header changes)"
    find Sources Plugins Tests -name '*.swift' -exec touch {} +
fi
mkdir -p .build
echo "$sum" > "$stamp"
