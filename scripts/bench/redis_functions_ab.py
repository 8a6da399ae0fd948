#!/usr/bin/env python3
"""Server time of the Redis reserve function, one git revision against another.

    python3 scripts/bench/redis_functions_ab.py [--port 6391] [--calls 20000] REV [REV...]

For each revision, builds the quota library from that revision's
`crates/spillway-redis/src/lua/` exactly as `store.rs` does (1-s window,
default adaptive settings), loads it into the Redis on `--port` under a
name of its own, then calls each revision's `reserve` in turn (one model,
two candidate regions, huge limits, fresh keys per revision) so that every
version sees the same moments of the machine. Server time per call comes
from `SLOWLOG` (threshold 0, so use a private Redis: this changes its
config while it runs and clears its slow log).

Interleaving matters on a VM, where the same call drifts by tens of
percent from one second to the next (BENCHMARKS.md, "fourth step").
"""
import argparse
import random
import socket
import statistics
import subprocess

SETTINGS = dict(window_us='1000000', log_ttl_ms='6000', state_ttl_ms='120000', headroom='1.0',
                cooldown_base_us='1000000', cooldown_max_us='60000000',
                probe_period_us='60000000')
FUNCTIONS = ['reserve', 'settle', 'states', 'configure', 'import']


def library(rev, name):
    def lua(f):
        return subprocess.run(['git', 'show', f'{rev}:crates/spillway-redis/src/lua/{f}.lua'],
                              capture_output=True, text=True, check=True).stdout
    common = lua('common')
    for k, v in SETTINGS.items():
        common = common.replace('{{%s}}' % k, v)
    code = f'#!lua name={name}\n{common}\n'
    for f in FUNCTIONS:
        code += f"redis.register_function('{name}_{f}', function(KEYS, ARGV)\n{lua(f)}\nend)\n"
    return code


class Redis:
    def __init__(self, port):
        self.s = socket.create_connection(('127.0.0.1', port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile('rb')

    def _read(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind in (b'+', b':'):
            return rest
        if kind == b'-':
            raise RuntimeError(rest.decode())
        if kind == b'$':
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if kind == b'*':
            return [self._read() for _ in range(int(rest))]
        raise RuntimeError(f'unexpected reply {line!r}')

    def __call__(self, *args):
        out = [b'*%d\r\n' % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b'$%d\r\n%s\r\n' % (len(a), a))
        self.s.sendall(b''.join(out))
        return self._read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--port', type=int, default=6391)
    ap.add_argument('--calls', type=int, default=20000)
    ap.add_argument('revs', nargs='+')
    a = ap.parse_args()
    r = Redis(a.port)
    names = []
    for i, rev in enumerate(a.revs):
        name = f'spillway_ab{i}'
        r('FUNCTION', 'LOAD', 'REPLACE', library(rev, name))
        names.append(name)
    batch = 1000
    old = r('CONFIG', 'GET', 'slowlog-log-slower-than')[1]
    r('CONFIG', 'SET', 'slowlog-max-len', str(batch * len(names) * 12 + 100))
    r('CONFIG', 'SET', 'slowlog-log-slower-than', '0')
    args = ['1', '0', '1200', '1024', '2', 'us', '4294967295', str(1 << 50), '-1', '-1',
            'eu', '4294967295', str(1 << 50), '-1', '-1']
    prefix = f'ab{random.randrange(1 << 30)}'
    keys = {n: [f'{prefix}{n}:{{m}}:drained'] + [f'{prefix}{n}:{{m}}:{reg}:{k}'
                                               for reg in ('us', 'eu') for k in ('entries', 'state')]
            for n in names}
    times = {n: [] for n in names}
    try:
        done = 0
        while done < a.calls:
            r('SLOWLOG', 'RESET')
            for _ in range(min(batch, a.calls - done)):
                for n in names:
                    r('FCALL', f'{n}_reserve', 5, *keys[n], *args)
            for entry in r('SLOWLOG', 'GET', '-1'):
                argv = entry[3]
                if argv[0] == b'FCALL':
                    times[argv[1].decode().rsplit('_', 1)[0]].append(int(entry[2]))
            done += batch
    finally:
        r('CONFIG', 'SET', 'slowlog-log-slower-than', old)
        r('SLOWLOG', 'RESET')
        for n in names:
            r('FUNCTION', 'DELETE', n)
    for rev, n in zip(a.revs, names):
        t = sorted(times[n])
        print(f'{rev:>12}: {len(t)} calls, server time per reserve: median {statistics.median(t):.0f} µs, '
              f'mean {statistics.mean(t):.1f}, p10 {t[len(t) // 10]}, p90 {t[len(t) * 9 // 10]}')


if __name__ == '__main__':
    main()
