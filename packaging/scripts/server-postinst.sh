#!/bin/sh
# keel-server: after install or upgrade.
#   deb: $1 = "configure", $2 = the previously configured version (empty on install)
#   rpm: $1 = 1 on install, 2 or more on upgrade
# DPKG_ROOT is set when installing into another root; then nothing is run.
set -e
root="${DPKG_ROOT:-}"
uid=$(awk -F: '$1 == "keel" { print $3 }' "$root/etc/passwd")
gid=$(awk -F: '$1 == "keel" { print $3 }' "$root/etc/group")
install -d -m 0700 -o "$uid" -g "$gid" "$root/var/lib/keel-server"
install -d -m 0750 -o "$uid" -g "$gid" "$root/var/log/keel-server"
if [ -f "$root/etc/keel/server.toml" ]; then
    chown "0:$gid" "$root/etc/keel/server.toml"
    chmod 0640 "$root/etc/keel/server.toml"
fi

upgrade=0
case "$1" in
    configure) [ -n "${2:-}" ] && upgrade=1 ;;
    [2-9]) upgrade=1 ;;
esac

# keelctl comes with both packages: /usr/bin/keelctl is an alternative.
alt=$(command -v update-alternatives || command -v alternatives || true)
if [ -n "$alt" ]; then
    "$alt" --install /usr/bin/keelctl keelctl /usr/lib/keel-server/keelctl 50 >/dev/null 2>&1 || true
fi

if [ -z "$root" ]; then
    # A CA on first install, named after this host, so the service can start.
    if [ ! -f /var/lib/keel-server/pki/ca.key ]; then
        if runuser -u keel -- /usr/bin/keel-server --config /etc/keel/server.toml ca init --san "$(hostname -f 2>/dev/null || hostname)" >/dev/null 2>&1; then
            echo "keel-server: CA created; agents pin: $(runuser -u keel -- /usr/bin/keel-server --config /etc/keel/server.toml ca fingerprint)"
        else
            echo "keel-server: create the CA with: runuser -u keel -- keel-server ca init --san <host name>"
        fi
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
        if [ "$upgrade" = 1 ]; then
            systemctl try-restart keel-server.service >/dev/null 2>&1 || true
        else
            systemctl enable keel-server.service >/dev/null 2>&1 || true
            systemctl start keel-server.service >/dev/null 2>&1 || true
        fi
    fi
fi
exit 0
