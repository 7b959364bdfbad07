#!/usr/bin/env python3
"""Agent keys from a MySQL or MariaDB table, for Keel's key-request plugin.

The replies are Wazuh key_request's: {"error":0,"data":{"id","name","ip","key"}}
or {"error":N,"message":"..."}. The table needs the columns id, name, ip and
agent_key; the value looked up is always bound as a query parameter.

  exec mode:    mysql_provider.py [options] id 001
                mysql_provider.py [options] ip 10.1.2.3
                prints one reply on stdout.
  socket mode:  mysql_provider.py [options] --serve /run/keel/key-request.sock
                a threaded unix-socket server (mode 0600): one request per
                connection ("id:001" or "ip:10.1.2.3"), one reply; one database
                connection per thread.

Connection settings come from the options, or else from KEEL_KR_DB_HOST,
KEEL_KR_DB_PORT, KEEL_KR_DB_USER, KEEL_KR_DB_NAME and KEEL_KR_DB_TABLE. The
password is read from --password-file (or KEEL_KR_DB_PASSWORD_FILE) or taken from
KEEL_KR_DB_PASSWORD; never from the command line, where any user can read it.
"""

import argparse
import json
import os
import queue
import re
import signal
import socket
import sys
import threading

import pymysql

REQUEST_MAX_BYTES = 64
DB_CONNECT_TIMEOUT_S = 5
DB_IO_TIMEOUT_S = 10
CLIENT_TIMEOUT_S = 10
DEFAULT_THREADS = 8
ID = re.compile(r"[0-9]{1,8}")
IP = re.compile(r"[0-9A-Fa-f:.]{1,19}")
TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# The lookup column for each request kind: a fixed choice, never request text.
COLUMN = {"id": "id", "ip": "ip"}
NOT_FOUND = {"error": 4, "message": "No agent key found"}


def parse_args(argv):
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default=env("KEEL_KR_DB_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("KEEL_KR_DB_PORT", "3306")))
    p.add_argument("--user", default=env("KEEL_KR_DB_USER", "keel"))
    p.add_argument("--password-file", default=env("KEEL_KR_DB_PASSWORD_FILE"))
    p.add_argument("--database", default=env("KEEL_KR_DB_NAME", "keel"))
    p.add_argument("--table", default=env("KEEL_KR_DB_TABLE", "agent"))
    p.add_argument("--serve", metavar="SOCKET", help="serve on this unix socket")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="socket mode: worker threads")
    p.add_argument("by", nargs="?", choices=sorted(COLUMN))
    p.add_argument("value", nargs="?")
    args = p.parse_args(argv)
    if not TABLE.fullmatch(args.table):
        p.error("--table must be a plain identifier")
    if args.serve is None and (args.by is None or args.value is None):
        p.error("give `id VALUE`, `ip VALUE` or --serve SOCKET")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def connect(args):
    password = os.environ.get("KEEL_KR_DB_PASSWORD", "")
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            password = f.read().strip()
    return pymysql.connect(host=args.host, port=args.port, user=args.user, password=password,
                           database=args.database, autocommit=True, connect_timeout=DB_CONNECT_TIMEOUT_S,
                           read_timeout=DB_IO_TIMEOUT_S, write_timeout=DB_IO_TIMEOUT_S)


def lookup(db, table, by, value):
    pattern = ID if by == "id" else IP
    if by not in COLUMN or not pattern.fullmatch(value):
        return {"error": 1, "message": "Invalid request"}
    with db.cursor() as cur:
        cur.execute(f"SELECT id, name, ip, agent_key FROM `{table}` WHERE `{COLUMN[by]}` = %s LIMIT 2",
                    (value,))
        rows = cur.fetchall()
    if not rows:
        return NOT_FOUND
    if len(rows) > 1:
        return {"error": 5, "message": "More than one agent matches"}
    agent_id, name, ip, key = rows[0]
    return {"error": 0, "data": {"id": agent_id, "name": name, "ip": ip, "key": key}}


def db_error(e):
    # The driver's messages name the server and the user, never the password.
    return {"error": 2, "message": f"Database error: {e}"}


def exec_mode(args):
    try:
        db = connect(args)
        try:
            reply = lookup(db, args.table, args.by, args.value)
        finally:
            db.close()
    except (pymysql.Error, OSError) as e:
        reply = db_error(e)
    sys.stdout.write(json.dumps(reply))


def worker(args, connections):
    db = None
    while True:
        conn = connections.get()
        with conn:
            try:
                conn.settimeout(CLIENT_TIMEOUT_S)
                by, _, value = conn.recv(REQUEST_MAX_BYTES).decode("ascii", "replace").strip().partition(":")
                try:
                    if db is None:
                        db = connect(args)
                    reply = lookup(db, args.table, by, value)
                except (pymysql.Error, OSError) as e:
                    if db is not None:
                        db.close()
                    db = None
                    reply = db_error(e)
                conn.sendall(json.dumps(reply).encode())
            except OSError:
                pass  # the client went away; nothing to answer


def serve(args):
    path = args.serve
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # whoever can connect can read keys: owner only
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(socket.SOMAXCONN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    connections = queue.SimpleQueue()
    for _ in range(args.threads):
        threading.Thread(target=worker, args=(args, connections), daemon=True).start()
    try:
        while True:
            conn, _ = listener.accept()
            connections.put(conn)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        os.unlink(path)


def main(argv):
    args = parse_args(argv)
    if args.serve:
        serve(args)
    else:
        exec_mode(args)


if __name__ == "__main__":
    main(sys.argv[1:])
