#!/bin/sh
# keel-agent: after install or upgrade.
#   deb: $1 = "configure", $2 = the previously configured version (empty on install)
#   rpm: $1 = 1 on install, 2 or more on upgrade
# DPKG_ROOT is set when installing into another root; then nothing is started.
set -e
root="${DPKG_ROOT:-}"
install -d -m 0700 "$root/var/lib/keel-agent"
install -d -m 0750 "$root/var/log/keel-agent"
[ -f "$root/etc/keel/agent.toml" ] && chmod 0640 "$root/etc/keel/agent.toml"

upgrade=0
case "$1" in
    configure) [ -n "${2:-}" ] && upgrade=1 ;;
    [2-9]) upgrade=1 ;;
esac

# keelctl comes with both packages: /usr/bin/keelctl is an alternative.
alt=$(command -v update-alternatives || command -v alternatives || true)
if [ -n "$alt" ]; then
    "$alt" --install /usr/bin/keelctl keelctl /usr/lib/keel-agent/keelctl 40 >/dev/null 2>&1 || true
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ "$upgrade" = 1 ]; then
        systemctl try-restart keel-agent.service >/dev/null 2>&1 || true
    else
        systemctl enable keel-agent.service >/dev/null 2>&1 || true
        # Without a server address in /etc/keel/agent.toml it exits 64 and waits.
        systemctl start keel-agent.service >/dev/null 2>&1 || true
    fi
fi
exit 0
