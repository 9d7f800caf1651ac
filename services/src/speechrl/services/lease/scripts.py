"""The lease's atomic steps as Lua scripts, run by Redis with no interleaving.

All keys of one device share the hash tag `{device}` so a Redis Cluster keeps them on one slot;
per-ticket keys (waiter liveness, wake-up list) are built inside the scripts from that prefix.
Tickets are random strings known only to their owner: every mutating script checks the ticket
first, so a process can only renew or release its own grant.

Per-device keys (prefix P = "<namespace>:{<device>}"):
  P:holder          ticket of the holder; its PX TTL is the lease: no heartbeat, no lease
  P:info            hash ticket/owner/fence/granted_ms of the current grant (survives TTL expiry,
                    so the next acquirer can count the expiry)
  P:queue           sorted set of waiting tickets; score = priority_rank * 2^40 + arrival seq
  P:owners          hash ticket -> owner label, for status displays
  P:waiter:<ticket> liveness of a waiter, PX waiter TTL; a waiter whose key lapsed is skipped
  P:notify:<ticket> list pushed on release to wake the next waiter at once
  P:fence           fencing-token counter: only grows, one increment per grant; created from the
                    server's clock in microseconds, so a Redis that lost it (restart without
                    persistence) starts above every fence it handed out before
  P:seq             arrival counter (FIFO within a priority class)
  P:stats           hash of counters: grants, releases, handoffs, expiries, skipped, reclaims
  P:arrived         hash ticket -> the Redis clock (ms) when it joined the queue, for its wait time
  P:events          stream of grants, releases and expiries (kind, owner, fence, at_ms, held_ms,
                    waited_ms, queue), capped at its newest events_max entries: the lease's own
                    record of who held the device when, which dashboards draw (status.lease_events)

Recovery after a Redis restart (see lease.py's docstring for why this is sound): while the Redis
server's uptime is below the lease TTL (plus one second, as INFO counts whole seconds), ACQUIRE
grants nothing, and RENEW lets a holder whose key vanished re-create it ("reclaim"). A caller may
pass the run_id that `declare_clean_start` recorded for this server; when it matches, the server
was declared to have started empty with nobody holding anything, and there is no quiet period.
"""

# Shared by ACQUIRE and RELEASE: the Redis clock in ms, and one event on the capped stream.
_EVENTS = """
local function now_ms()
  local now = redis.call('TIME')
  return now[1] * 1000 + math.floor(now[2] / 1000)
end
local function record(prefix, cap, kind, owner, fence, at_ms, held_ms, waited_ms, queue)
  redis.call('XADD', prefix .. ':events', 'MAXLEN', cap, '*', 'kind', kind, 'owner', owner or '?',
             'fence', fence or 0, 'at_ms', at_ms, 'held_ms', held_ms, 'waited_ms', waited_ms, 'queue', queue)
end
"""

# Shared by ACQUIRE and RENEW. True while a holder from before a restart may still be working.
_RECOVERY = """
local function recovering(ttl_ms, clean_run_id)
  local info = redis.call('INFO', 'server')
  if clean_run_id ~= '' and clean_run_id == string.match(info, 'run_id:(%x+)') then return false end
  local uptime_s = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
  return uptime_s * 1000 < tonumber(ttl_ms) + 1000
end
"""

# KEYS: holder, info, queue, fence, seq, stats, owners
# ARGV: ticket, holder_ttl_ms, waiter_ttl_ms, priority_rank, owner, prefix, enqueue (1 = first call),
#       clean_run_id ('' when none is known), events_max
# Returns {state, value, expired, recovering}: state 1 = granted (value = fencing token), 0 = waiting
# (value = 0-based queue position), -1 = dropped as a dead waiter (value 0); expired = 1 when
# this call found a holder whose TTL had run out; recovering = 1 when the device is free but the
# server is in its post-restart quiet period.
ACQUIRE = _RECOVERY + _EVENTS + """
local ticket = ARGV[1]
local prefix = ARGV[6]
local holder = redis.call('GET', KEYS[1])
if holder == ticket then
  return {1, tonumber(redis.call('HGET', KEYS[2], 'fence')), 0, 0}
end
if not redis.call('ZSCORE', KEYS[3], ticket) then
  if ARGV[7] ~= '1' then
    return {-1, 0, 0, 0}
  end
  local seq = redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) * 1099511627776 + seq, ticket)
  redis.call('HSET', KEYS[7], ticket, ARGV[5])
  redis.call('HSET', prefix .. ':arrived', ticket, now_ms())
end
redis.call('SET', prefix .. ':waiter:' .. ticket, '1', 'PX', ARGV[3])
if holder then
  return {0, redis.call('ZRANK', KEYS[3], ticket), 0, 0}
end
if recovering(ARGV[2], ARGV[8]) then
  return {0, redis.call('ZRANK', KEYS[3], ticket), 0, 1}
end
local expired = 0
if redis.call('HEXISTS', KEYS[2], 'ticket') == 1 then
  redis.call('HINCRBY', KEYS[6], 'expiries', 1)
  local lapsed = redis.call('HMGET', KEYS[2], 'owner', 'fence', 'granted_ms')
  local at = now_ms()
  record(prefix, ARGV[9], 'expire', lapsed[1], lapsed[2], at, at - tonumber(lapsed[3] or at), 0,
         redis.call('ZCARD', KEYS[3]))
  redis.call('DEL', KEYS[2])
  expired = 1
end
while true do
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if head == ticket then break end
  if redis.call('EXISTS', prefix .. ':waiter:' .. head) == 1 then
    return {0, redis.call('ZRANK', KEYS[3], ticket), expired, 0}
  end
  redis.call('ZREM', KEYS[3], head)
  redis.call('HDEL', KEYS[7], head)
  redis.call('HDEL', prefix .. ':arrived', head)
  redis.call('DEL', prefix .. ':notify:' .. head)
  redis.call('HINCRBY', KEYS[6], 'skipped', 1)
end
redis.call('ZREM', KEYS[3], ticket)
redis.call('DEL', prefix .. ':waiter:' .. ticket, prefix .. ':notify:' .. ticket)
local now = redis.call('TIME')
if redis.call('EXISTS', KEYS[4]) == 0 then  -- string concatenation: Lua numbers print as 1.7e+15
  redis.call('SET', KEYS[4], now[1] .. string.rep('0', 6 - #now[2]) .. now[2])
end
local fence = redis.call('INCR', KEYS[4])
local granted_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('SET', KEYS[1], ticket, 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'ticket', ticket, 'owner', ARGV[5], 'fence', fence, 'granted_ms', granted_ms)
redis.call('HINCRBY', KEYS[6], 'grants', 1)
local arrived = tonumber(redis.call('HGET', prefix .. ':arrived', ticket) or granted_ms)
redis.call('HDEL', prefix .. ':arrived', ticket)
record(prefix, ARGV[9], 'grant', ARGV[5], fence, granted_ms, 0, granted_ms - arrived, redis.call('ZCARD', KEYS[3]))
return {1, fence, expired, 0}
"""

# KEYS: holder, info, fence, stats
# ARGV: ticket, holder_ttl_ms, fence, owner, clean_run_id
# Returns 1 when the TTL was extended, 2 when the holder's key had vanished in a restart and was
# re-created (reclaimed), 0 when ticket no longer holds the lease.
# A reclaim needs: nobody else holds it, no newer grant is recorded (info names no other ticket,
# the fence counter is not past ours), and the server is recovering, so no one else can have been
# granted since the restart.
RENEW = _RECOVERY + """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
local info_ticket = redis.call('HGET', KEYS[2], 'ticket')
if info_ticket and info_ticket ~= ARGV[1] then return 0 end
local counter = redis.call('GET', KEYS[3])
if counter and tonumber(counter) > tonumber(ARGV[3]) then return 0 end
if not recovering(ARGV[2], ARGV[5]) then return 0 end
local now = redis.call('TIME')
if not counter then  -- as ACQUIRE does: later grants start above every fence of the lost state
  redis.call('SET', KEYS[3], now[1] .. string.rep('0', 6 - #now[2]) .. now[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'ticket', ARGV[1], 'owner', ARGV[4], 'fence', ARGV[3],
           'granted_ms', now[1] * 1000 + math.floor(now[2] / 1000))
redis.call('HINCRBY', KEYS[4], 'reclaims', 1)
return 2
"""

# KEYS: holder, info, queue, stats, owners
# ARGV: ticket, prefix, events_max
# Returns 1 when released, 0 when ticket was not the holder (its lease had already lapsed).
# Wakes the first live waiter so the handoff does not wait for a poll.
RELEASE = _EVENTS + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local held = redis.call('HMGET', KEYS[2], 'owner', 'fence', 'granted_ms')
local at = now_ms()
record(ARGV[2], ARGV[3], 'release', held[1], held[2], at, at - tonumber(held[3] or at), 0, redis.call('ZCARD', KEYS[3]))
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'releases', 1)
for _, head in ipairs(redis.call('ZRANGE', KEYS[3], 0, 7)) do
  if redis.call('EXISTS', ARGV[2] .. ':waiter:' .. head) == 1 then
    redis.call('RPUSH', ARGV[2] .. ':notify:' .. head, '1')
    redis.call('PEXPIRE', ARGV[2] .. ':notify:' .. head, 60000)
    redis.call('HINCRBY', KEYS[4], 'handoffs', 1)
    break
  end
end
return 1
"""

# KEYS: queue, owners
# ARGV: ticket, prefix
# Leaves the queue (a waiter that gives up). Returns 1 when it was queued.
CANCEL = """
redis.call('DEL', ARGV[2] .. ':waiter:' .. ARGV[1], ARGV[2] .. ':notify:' .. ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', ARGV[2] .. ':arrived', ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""
