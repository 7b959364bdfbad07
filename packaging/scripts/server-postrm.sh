#!/bin/sh
# keel-server: after removal.
#   deb: $1 = "remove", "purge", "upgrade", …; rpm: $1 = 0 on erase, 1 on upgrade
# Purge (deb) deletes the state: CA, registry, records, logs. The keel user stays,
# so files it may still own elsewhere are never orphaned to a reused uid.
root="${DPKG_ROOT:-}"
if [ "$1" = purge ]; then
    rm -rf "$root/var/lib/keel-server" "$root/var/log/keel-server"
    rmdir "$root/etc/keel" 2>/dev/null || true
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
