//! Lua scripts: the group's lease store (members, and a compare-and-set lease per partition,
//! atomic inside Redis, on Redis's clock) that core's ownership engine drives, and moving due
//! delayed messages.

use std::sync::LazyLock;

use redis::Script;

/// Refreshes (or, with ARGV[3] = 1, removes) a member of a group and returns the live ones.
///
/// KEYS[1] members sorted set (scored by heartbeat expiry, Redis `TIME`), KEYS[2] membership
/// generation counter. ARGV: member id, lease TTL ms, leave (0 or 1). Drops members whose
/// heartbeat expired; a change of membership bumps the generation, which the other members
/// poll to rebalance quickly.
pub(crate) static MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, leave = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local changed
if leave then
  changed = redis.call('ZREM', KEYS[1], me)
else
  changed = redis.call('ZADD', KEYS[1], now + ttl, me)
end
changed = changed + redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if changed > 0 then redis.call('INCR', KEYS[2]) end
redis.call('PEXPIRE', KEYS[1], ttl * 10)
redis.call('PEXPIRE', KEYS[2], ttl * 10)
return redis.call('ZRANGE', KEYS[1], 0, -1)
",
    )
});

/// A partition's lease: `{owner, revision, after}`.
///
/// KEYS[1] lease (the owner's id, `PX` lease TTL), KEYS[2] revision counter, KEYS[3] how the
/// last owner gave it up (`clean`; missing after a hold, an expiry or never). `owner` is empty
/// when the lease is free.
pub(crate) static LEASE_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local owner = redis.call('GET', KEYS[1]) or ''
local rev = tonumber(redis.call('GET', KEYS[2]) or '0')
local after = redis.call('GET', KEYS[3]) or 'hold'
return {owner, rev, after}
",
    )
});

/// Takes a free lease at the expected revision: returns the new revision, or -1 when the
/// lease is held or another write came first. KEYS as [`LEASE_READ`]; ARGV: member id,
/// expected revision, lease TTL ms.
pub(crate) static LEASE_TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local me, expected, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= expected then return -1 end
local rev = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ttl * 10)
redis.call('SET', KEYS[1], me, 'PX', ttl)
redis.call('DEL', KEYS[3])
return rev
",
    )
});

/// Renews a lease its owner holds at the expected revision: returns the revision, or -1 when
/// the lease was lost (expired, or taken by another member). KEYS as [`LEASE_READ`]; ARGV:
/// member id, expected revision, lease TTL ms.
pub(crate) static LEASE_RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local me, expected, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('GET', KEYS[1]) ~= me then return -1 end
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= expected then return -1 end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl * 10)
return expected
",
    )
});

/// Gives a lease up at the expected revision, saying how (ARGV[2]: `clean` or `hold`);
/// nothing when another write came first. KEYS as [`LEASE_READ`]; ARGV: expected revision,
/// how, lease TTL ms.
pub(crate) static LEASE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local expected, how, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= expected then return 0 end
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ttl * 10)
if how == 'clean' then
  redis.call('SET', KEYS[3], 'clean', 'PX', ttl * 10)
else
  redis.call('DEL', KEYS[3])
end
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
