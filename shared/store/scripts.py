"""The Lua scripts behind each status transition of a request record.

Status only moves forward (queued → running → final). Each transition is one
script, so two workers, or a worker and a cancelling client, can't both win.
"""

# Writes `fields` (a flat JSON array k1, v1, k2, v2 ...) as an HSET.
LUA_HSET_JSON = """
local function hset_json(key, encoded)
  local flat = cjson.decode(encoded)
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end
"""

# Redis's own clock, so that leases mean the same on every worker whatever their clocks say.
LUA_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""

# KEYS: record. ARGV: now, worker, ttl, fields to create a missing record with, lease seconds.
# Returns {verdict, attempts}: verdict 'run'; 'leased' while another claim's lease
# (renewed by the worker running it) has not lapsed; or the final status, to skip.
CLAIM = LUA_HSET_JSON + LUA_NOW + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  hset_json(KEYS[1], ARGV[4])
  status = 'queued'
end
local now = server_now()
if status == 'running' and tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0') > now then
  return {'leased', tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2],
             'lease_until', tostring(now + tonumber(ARGV[5])))
  local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'run', attempts}
end
return {status, 0}
"""

# KEYS: record. ARGV: worker, lease seconds (0: let it lapse now, for a request handed back).
# Returns 1 if this worker still holds the running claim, else 0.
RENEW = LUA_NOW + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', tostring(server_now() + tonumber(ARGV[2])))
return 1
"""

# KEYS: record, done channel. ARGV: ttl, result fields, fields to create a
# missing record with, id. Returns 1 if written, 0 if the record was final.
FINISH = LUA_HSET_JSON + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'queued' and status ~= 'running' then return 0 end
if not status then hset_json(KEYS[1], ARGV[3]) end
hset_json(KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[4])
return 1
"""

# Admission: an Idempotency-Key seen before answers with its request; else one token
# from the caller's bucket (if rate-limited), then the new record unless its id is
# taken (a chosen id must not overwrite another request), and the key's claim.
# KEYS: bucket, record, and the idempotency key when the client sent one.
# ARGV: rate per second (0: no limit), burst, record ttl, fields, bucket ttl, id,
# body fingerprint, idempotency window seconds.
# Returns {'created'}; {'rate_limited', seconds until a token is free}; {'id_in_use'};
# or for a key seen before {'replay', its id} (same body) or {'key_reused', its id}.
ADMIT = LUA_HSET_JSON + """
if KEYS[3] then
  local claimed = redis.call('HMGET', KEYS[3], 'id', 'fingerprint')
  if claimed[1] then return {claimed[2] == ARGV[7] and 'replay' or 'key_reused', claimed[1]} end
end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens = math.min(burst, (tonumber(bucket[1]) or burst) + (now - (tonumber(bucket[2]) or now)) * rate)
  if tokens < 1 then return {'rate_limited', tostring((1 - tokens) / rate)} end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'id_in_use'} end
hset_json(KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if KEYS[3] then
  redis.call('HSET', KEYS[3], 'id', ARGV[6], 'fingerprint', ARGV[7])
  redis.call('EXPIRE', KEYS[3], ARGV[8])
end
return {'created'}
"""

# KEYS: record, done channel, cancel channel. ARGV: now, ttl, id.
# Returns 'cancelled' if this call cancelled it, the status if it was final, nil if unknown.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'finish_reason', 'cancelled')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  redis.call('PUBLISH', KEYS[3], ARGV[3])
  return 'cancelled'
end
return status
"""
