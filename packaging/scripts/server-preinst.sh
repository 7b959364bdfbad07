#!/bin/sh
# keel-server: before install or upgrade: the system user it runs as.
set -e
root="${DPKG_ROOT:-}"
if ! grep -q '^keel:' "$root/etc/passwd" 2>/dev/null; then
    if [ -n "$root" ]; then prefix="--prefix $root"; else prefix=""; fi
    # shellcheck disable=SC2086
    useradd $prefix --system --user-group --home-dir /var/lib/keel-server --no-create-home \
        --shell /usr/sbin/nologin --comment "Keel server" keel
fi
exit 0
