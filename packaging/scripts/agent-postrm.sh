#!/bin/sh
# keel-agent: after removal.
#   deb: $1 = "remove", "purge", "upgrade", …; rpm: $1 = 0 on erase, 1 on upgrade
# Purge (deb) deletes the state: identity, certificates, spool, plugins, logs. An
# rpm erase keeps them, as rpm has no purge.
root="${DPKG_ROOT:-}"
if [ "$1" = purge ]; then
    rm -rf "$root/var/lib/keel-agent" "$root/var/log/keel-agent"
    rmdir "$root/etc/keel" 2>/dev/null || true
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
