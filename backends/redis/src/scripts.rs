//! Lua scripts: every lease decision runs atomically inside Redis, on Redis's clock.

use std::sync::LazyLock;

use redis::Script;

/// Heartbeat and rebalance for one member of a group.
///
/// KEYS[1] members sorted set, KEYS[2] membership generation counter. ARGV: member id, lease
/// TTL ms, partition count, lease key prefix.
/// Refreshes the member, drops members whose heartbeat expired (a change of membership bumps
/// the generation, which the other members poll to rebalance quickly), assigns partition `p` to the
/// `p mod m`-th live member (members sorted by id) and returns, per partition:
/// `own` (ours and assigned to us; lease renewed), `release` (ours but assigned to another:
/// lease renewed until we hand it over), `acquired` (was free and assigned to us: now ours),
/// `wait` (assigned to us but another member still holds it), `free`, `other`.
pub(crate) static REBALANCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, n, prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local added = redis.call('ZADD', KEYS[1], now + ttl, me)
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if added + removed > 0 then redis.call('INCR', KEYS[2]) end
redis.call('PEXPIRE', KEYS[1], ttl * 10)
redis.call('PEXPIRE', KEYS[2], ttl * 10)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
local m = #members
local out = {}
for p = 0, n - 1 do
  local lease = prefix .. p
  local desired = members[(p % m) + 1]
  local owner = redis.call('GET', lease)
  if owner == me then
    redis.call('PEXPIRE', lease, ttl)
    if desired == me then out[p + 1] = 'own' else out[p + 1] = 'release' end
  elseif not owner then
    if desired == me then
      redis.call('SET', lease, me, 'PX', ttl)
      out[p + 1] = 'acquired'
    else
      out[p + 1] = 'free'
    end
  else
    if desired == me then out[p + 1] = 'wait' else out[p + 1] = 'other' end
  end
end
return out
",
    )
});

/// Releases the leases given in ARGV[2..] if `ARGV[1]` holds them; with KEYS[1] (members)
/// and KEYS[2] (generation) set, also leaves the group.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local me = ARGV[1]
for i = 2, #ARGV do
  if redis.call('GET', ARGV[i]) == me then redis.call('DEL', ARGV[i]) end
end
if KEYS[1] and redis.call('ZREM', KEYS[1], me) > 0 then redis.call('INCR', KEYS[2]) end
return 1
",
    )
});

/// Moves due delayed messages into their partition streams.
///
/// KEYS[1] delayed sorted set. ARGV: stream key prefix, retention (MAXLEN ~), entry list
/// prefix, batch limit. Each delayed message is a list `[partition, field, value, ...]`.
pub(crate) static MOVE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do
  local list = ARGV[3] .. id
  local f = redis.call('LRANGE', list, 0, -1)
  if #f > 1 then
    local p = table.remove(f, 1)
    redis.call('XADD', ARGV[1] .. p, 'MAXLEN', '~', ARGV[2], '*', unpack(f))
  end
  redis.call('DEL', list)
  redis.call('ZREM', KEYS[1], id)
end
return #due
",
    )
});
