#!/bin/sh
# keel-server: before removal.
#   deb: $1 = "remove" or "upgrade" (and others); rpm: $1 = 0 on erase, 1 on upgrade
root="${DPKG_ROOT:-}"
case "$1" in
    remove | 0)
        alt=$(command -v update-alternatives || command -v alternatives || true)
        [ -n "$alt" ] && "$alt" --remove keelctl /usr/lib/keel-server/keelctl >/dev/null 2>&1
        if [ -z "$root" ] && [ -d /run/systemd/system ]; then
            systemctl stop keel-server.service >/dev/null 2>&1 || true
            systemctl disable keel-server.service >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
