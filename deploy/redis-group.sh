#!/bin/sh
# The replicated Redis of docker-compose.yml: data nodes (redis-0, redis-1) and three Sentinels,
# each in a container of the Redis image, with this script mounted as /usr/local/bin/redis-group;
# and the Edge's Redis (edge-redis), one Redis of its own with a password of its own.
# A POSIX sh port of what `mailyard site up --redis-replicas N` decides (core/site/redis_group.py),
# for busybox (the official redis:*-alpine) and Debian alike.
#
#   redis-group node redis-server CONF ARGS...      entry point of a data node
#   redis-group sentinel redis-server CONF --sentinel  entry point of a Sentinel
#   redis-group single redis-server CONF ARGS...    entry point of a Redis of its own (the Edge's)
#   redis-group secret               generate the password if there is none yet
#   redis-group role                 the role this data node would start in now (one line)
#   redis-group health node|sentinel|single the container's health check
#   redis-group roles                who the Sentinels name primary, and each node's role
#   redis-group cli ARGS...          redis-cli with the group's password (never on its command line)
#
# The password: the first member to start generates it into the redis-secret volume (file
# MAILYARD_REDIS_PASSWORD_FILE, uid 10001, the Mailyard image's user, mode 0600). Each member
# writes its candidate to a file of its own and links it into place (`ln` never replaces a
# file): of members starting at once, one link wins and every member reads that one. The
# data nodes and the Sentinels all use it (requirepass, masterauth, auth-pass). The Edge's
# Redis makes its own the same way, in a file and a volume of its own (its
# MAILYARD_REDIS_PASSWORD_FILE): it never has the group's.
#
# The role a data node starts in (the rule of start_role in core/site/redis_group.py):
# - it asks the Sentinels (SENTINEL get-master-addr-by-name; the answer most of them give);
# - another node is primary: it starts as that one's replica;
# - it is the one they name: it starts as primary if it has its data (an AOF in /data), or if
#   every other node answers and holds no key (a new group); otherwise its data is gone (the
#   machine was lost) and it would come back as an empty primary, which its replicas would
#   copy, erasing everything: it waits until the Sentinels have promoted a replica, then
#   starts as that one's replica;
# - no Sentinel answers (they start with the group; each one's first start names the first
#   node primary): the first node starts as primary only if it has no data and every other
#   node answers with none (a new group); another node without data starts as the first
#   node's replica (it has nothing to lose); a node with data waits for the Sentinels (it may
#   be an old primary, and a guess could make the newest data a copy of older).
# A waiting node asks again every second and says why every 15 s; its health check fails.
#
# Settings (environment; defaults as docker-compose.yml names the members):
#   MAILYARD_REDIS_SELF       this member's host:port as the others reach it (its service name)
#   MAILYARD_REDIS_NODES      the data nodes, the first one first ("redis-0:6379 redis-1:6379")
#   MAILYARD_REDIS_SENTINELS  the Sentinels ("sentinel-1:26379 sentinel-2:26379 sentinel-3:26379")
#   MAILYARD_REDIS_SERVICE    the name the Sentinels monitor the primary by (mailyard)
#   MAILYARD_REDIS_QUORUM     Sentinels that must agree the primary is down (2)
#   MAILYARD_SENTINEL_DOWN_AFTER_MS, MAILYARD_SENTINEL_FAILOVER_TIMEOUT_MS  (5000, 10000)
#   MAILYARD_REDIS_DATA       a data node's data directory, a Sentinel's config directory (/data)
#   MAILYARD_REDIS_OWNER      who owns the password file (10001:10001; "" for no chown)
set -eu
umask 077  # every file it writes holds the password (Sentinel's own rewrites too)

SECRET=${MAILYARD_REDIS_PASSWORD_FILE:-/run/mailyard/redis/password}
NODES=${MAILYARD_REDIS_NODES:-redis-0:6379 redis-1:6379}
SENTINELS=${MAILYARD_REDIS_SENTINELS:-sentinel-1:26379 sentinel-2:26379 sentinel-3:26379}
SERVICE=${MAILYARD_REDIS_SERVICE:-mailyard}
QUORUM=${MAILYARD_REDIS_QUORUM:-2}
DOWN_AFTER_MS=${MAILYARD_SENTINEL_DOWN_AFTER_MS:-5000}
FAILOVER_TIMEOUT_MS=${MAILYARD_SENTINEL_FAILOVER_TIMEOUT_MS:-10000}
SELF=${MAILYARD_REDIS_SELF:-}
DATA=${MAILYARD_REDIS_DATA:-/data}
OWNER=${MAILYARD_REDIS_OWNER-10001:10001}

say() { echo "redis-group: $*" >&2; }
die() { say "$*"; exit 1; }

# region: the password

ensure_secret() {
    (
        umask 077
        if [ ! -s "$SECRET" ]; then
            candidate="$SECRET.${HOSTNAME:-member}.$$"
            head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$candidate"
            ln "$candidate" "$SECRET" 2>/dev/null || true  # the first link wins; the others read it
            rm -f "$candidate"
        fi
    )
    [ -s "$SECRET" ] || die "no password in $SECRET"
    if [ -n "$OWNER" ]; then chown "$OWNER" "$SECRET"; fi
    REDISCLI_AUTH=$(cat "$SECRET")
    export REDISCLI_AUTH
}

use_secret() {
    # For the commands run in a running container (health, role, roles, cli): read it only.
    [ -r "$SECRET" ] || die "cannot read the Redis password file $SECRET"
    REDISCLI_AUTH=$(cat "$SECRET")
    export REDISCLI_AUTH
}

# endregion
# region: asking the members

cli_at() {
    # cli_at HOST:PORT ARGS...: one question, at most 3 s, the password from REDISCLI_AUTH.
    at=$1
    shift
    timeout 3 redis-cli -h "${at%:*}" -p "${at##*:}" --raw "$@"
}

field() {
    # field NAME: the value of NAME in the INFO reply in $info ("role", "master_host"...).
    printf '%s\n' "$info" | tr -d '\r' | sed -n "s/^$1://p"
}

answers() {
    # The reply of a member that answered (not an error): "# Server..." of INFO, PONG...
    case $1 in
        '' | NOAUTH* | WRONGPASS* | ERR* | LOADING* | MASTERDOWN* | *"Could not connect"*) return 1 ;;
    esac
    return 0
}

sentinel_says() {
    # The primary's host:port as the Sentinel at $1 has it; fails when it does not answer.
    reply=$(cli_at "$1" SENTINEL get-master-addr-by-name "$SERVICE" 2>/dev/null) || return 1
    host=$(printf '%s\n' "$reply" | sed -n 1p)
    port=$(printf '%s\n' "$reply" | sed -n 2p)
    case $port in '' | *[!0-9]*) return 1 ;; esac
    [ -n "$host" ] || return 1
    echo "$host:$port"
}

ask_sentinels() {
    # The primary most Sentinels name (the first one's answer on a tie); fails when none answers.
    said=""
    for s in $SENTINELS; do
        if a=$(sentinel_says "$s"); then said="$said$a
"; fi
    done
    [ -n "$said" ] || return 1
    printf '%s' "$said" | awk '{ n[$0]++; if (!($0 in first)) first[$0] = NR }
        END { for (a in n) if (best == "" || n[a] > n[best] || (n[a] == n[best] && first[a] < first[best])) best = a; print best }'
}

address_of() { getent hosts "$1" 2>/dev/null | awk '{ print $1; exit }'; }

same_member() {
    # Whether host:port $1 and $2 are one member (by name, or by the address a name resolves to).
    [ "$1" = "$2" ] && return 0
    [ "${1##*:}" = "${2##*:}" ] || return 1
    a=$(address_of "${1%:*}")
    b=$(address_of "${2%:*}")
    [ -n "$a" ] && [ "$a" = "$b" ]
}

has_data() {
    # An AOF (Redis 7: appendonlydir/; 6: appendonly.aof) or a copy taken from a primary.
    for f in "$DATA"/appendonlydir/* "$DATA"/appendonly.aof "$DATA"/dump.rdb; do
        [ -s "$f" ] && return 0
    done
    return 1
}

holds_nothing() {
    # The node at $1 answers, has loaded what it had, and holds no key.
    info=$(cli_at "$1" INFO 2>/dev/null) || return 1
    answers "$info" || return 1
    printf '%s\n' "$info" | grep -q '^loading:0' || return 1
    ! printf '%s\n' "$info" | grep -q '^db[0-9][0-9]*:keys='
}

others_hold_nothing() {
    for n in $NODES; do
        same_member "$n" "$SELF" && continue
        holds_nothing "$n" || {
            other=$n
            return 1
        }
    done
    return 0
}

decide() {
    # One line: "primary", "replica HOST PORT" or "wait REASON".
    [ -n "$SELF" ] || die "MAILYARD_REDIS_SELF is not set (this node's host:port)"
    first=${NODES%% *}
    other=""
    if known=$(ask_sentinels); then
        if ! same_member "$known" "$SELF"; then
            echo "replica ${known%:*} ${known##*:}"
        elif has_data || others_hold_nothing; then
            echo primary
        else
            echo "wait the Sentinels name this node ($SELF) primary, but it has no data and $other may have:" \
                "waiting for them to promote a replica (an empty primary would erase its replicas)"
        fi
    elif same_member "$first" "$SELF"; then
        if ! has_data && others_hold_nothing; then
            echo primary
        else
            echo "wait no Sentinel answers ($SENTINELS) and ${other:-this node} may have data:" \
                "waiting for them to say who is primary"
        fi
    elif has_data; then
        echo "wait no Sentinel answers ($SENTINELS) and this node has data: waiting for them to say" \
            "who is primary"
    else
        echo "replica ${first%:*} ${first##*:}"
    fi
}

# endregion
# region: entry points

conf_in() {
    # The config file of a redis-server command line (its first argument ending in .conf).
    for a in "$@"; do
        case $a in *.conf) echo "$a"; return 0 ;; esac
    done
    die "no config file (*.conf) in the command: $*"
}

node() {
    ensure_secret
    conf=$(conf_in "$@")
    mkdir -p "${conf%/*}"
    # Written on every start (a rotated password takes effect; the role is decided below, so
    # what Sentinel's CONFIG REWRITE left here is replaced), readable by Redis only.
    (umask 077 && printf 'requirepass "%s"\nmasterauth "%s"\n' "$REDISCLI_AUTH" "$REDISCLI_AUTH" >"$conf")
    chown redis:redis "${conf%/*}" "$conf" 2>/dev/null || true
    # The replicas' primary and the Sentinels know this node by its name (its address changes
    # when the container is recreated).
    set -- "$@" --replica-announce-ip "${SELF%:*}"
    n=0
    while :; do
        role=$(decide)
        case $role in
            primary) break ;;
            replica*)
                set -- "$@" --replicaof $(echo "$role" | cut -d' ' -f2-3)
                break
                ;;
        esac
        [ $((n % 15)) -ne 0 ] || say "$role"
        n=$((n + 1))
        sleep 1
    done
    say "$SELF starts as $role"
    exec docker-entrypoint.sh "$@"
}

single() {
    # One Redis, no group: its password (generated as the group's is, into its own file) in
    # its config file, written on every start.
    ensure_secret
    conf=$(conf_in "$@")
    mkdir -p "${conf%/*}"
    (umask 077 && printf 'requirepass "%s"\n' "$REDISCLI_AUTH" >"$conf")
    chown redis:redis "${conf%/*}" "$conf" 2>/dev/null || true
    exec docker-entrypoint.sh "$@"
}

sentinel() {
    ensure_secret
    conf=$(conf_in "$@")
    if [ ! -s "$conf" ]; then
        # Its first start: monitor the first node (a new group's primary). Sentinel rewrites
        # this file from then on (the current primary, the other Sentinels, its own id).
        first=${NODES%% *}
        (umask 077 && cat >"$conf" <<EOF
# Written by redis-group when this Sentinel first started; Sentinel rewrites it since.
port ${SELF##*:}
dir "$DATA"
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip "${SELF%:*}"
sentinel monitor $SERVICE ${first%:*} ${first##*:} $QUORUM
EOF
        )
    fi
    # On every start: the password (rotated if it changed) and the timings, after the monitor line.
    tmp="$conf.$$.tmp"
    grep -Ev "^(requirepass|user default|sentinel (auth-pass|down-after-milliseconds|failover-timeout|parallel-syncs) $SERVICE) " \
        "$conf" >"$tmp" || true
    {
        printf 'requirepass "%s"\n' "$REDISCLI_AUTH"
        printf 'sentinel auth-pass %s %s\n' "$SERVICE" "$REDISCLI_AUTH"
        printf 'sentinel down-after-milliseconds %s %s\n' "$SERVICE" "$DOWN_AFTER_MS"
        printf 'sentinel failover-timeout %s %s\n' "$SERVICE" "$FAILOVER_TIMEOUT_MS"
        printf 'sentinel parallel-syncs %s 1\n' "$SERVICE"
    } >>"$tmp"
    chmod 0600 "$tmp"
    mv "$tmp" "$conf"
    exec docker-entrypoint.sh "$@"
}

health() {
    use_secret
    at="127.0.0.1:${SELF##*:}"
    case ${1:-} in
        node)
            # It answers, with the password, once the AOF is loaded (while loading: LOADING),
            # and does its part: a primary has a replica in sync (without one it refuses
            # writes: min-replicas-to-write), a replica is linked to its primary. A node that
            # waits for a failover before it starts does not answer.
            [ "$(cli_at "$at" PING 2>/dev/null)" = PONG ] || die "no PONG"
            info=$(cli_at "$at" INFO replication 2>/dev/null)
            case $(field role) in
                master)
                    good=$(field min_slaves_good_slaves)
                    [ "${good:-$(field connected_slaves)}" -ge 1 ] || die "a primary without a replica in sync refuses writes"
                    ;;
                slave) [ "$(field master_link_status)" = up ] || die "not linked to its primary $(field master_host)" ;;
                *) die "no role" ;;
            esac
            ;;
        sentinel)
            # It sees the primary up (flags exactly "master": not down, no failover under
            # way), knows a replica to promote, and enough Sentinels to agree that the primary
            # is down and to authorize a failover.
            master=$(cli_at "$at" SENTINEL master "$SERVICE" 2>/dev/null)
            value() { printf '%s\n' "$master" | awk -v k="$1" 'p { print; exit } $0 == k { p = 1 }'; }
            [ "$(value flags)" = master ] || die "the primary's flags: $(value flags)"
            [ "$(value num-slaves)" -ge 1 ] 2>/dev/null || die "no replica known"
            quorum=$(cli_at "$at" SENTINEL ckquorum "$SERVICE" 2>&1) || die "$quorum"
            case $quorum in OK*) ;; *) die "$quorum" ;; esac
            ;;
        single) [ "$(cli_at "$at" PING 2>/dev/null)" = PONG ] || die "no PONG" ;;
        *) die "health node|sentinel|single" ;;
    esac
}

roles() {
    use_secret
    for s in $SENTINELS; do
        echo "${s%:*}: primary $(sentinel_says "$s" || echo "? (no answer)")"
    done
    for n in $NODES; do
        info=$(cli_at "$n" INFO replication 2>/dev/null) || info=""
        if ! answers "$info"; then
            echo "${n%:*}: no answer"
            continue
        fi
        if [ "$(field role)" = master ]; then
            echo "${n%:*}: primary, $(field connected_slaves) replica(s) connected"
        else
            echo "${n%:*}: replica of $(field master_host):$(field master_port), link $(field master_link_status)"
        fi
    done
}

# endregion

command=${1:-}
[ $# -eq 0 ] || shift
case $command in
    node) [ -n "$SELF" ] || die "MAILYARD_REDIS_SELF is not set (this node's host:port)"; node "$@" ;;
    sentinel) sentinel "$@" ;;
    single) single "$@" ;;
    secret) ensure_secret ;;
    role) use_secret && decide ;;
    health) health "$@" ;;
    roles) roles ;;
    cli) use_secret && exec redis-cli "$@" ;;
    *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
