#!/bin/sh
# keel-agent: before removal.
#   deb: $1 = "remove" or "upgrade" (and others); rpm: $1 = 0 on erase, 1 on upgrade
root="${DPKG_ROOT:-}"
case "$1" in
    remove | 0)
        alt=$(command -v update-alternatives || command -v alternatives || true)
        [ -n "$alt" ] && "$alt" --remove keelctl /usr/lib/keel-agent/keelctl >/dev/null 2>&1
        if [ -z "$root" ] && [ -d /run/systemd/system ]; then
            systemctl stop keel-agent.service >/dev/null 2>&1 || true
            systemctl disable keel-agent.service >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
