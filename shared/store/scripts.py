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

# A request's token stream gets entries only while a client watches it (ATTACH
# created it). Each entry is `at` (the byte offset in the record's text where
# its delta starts), `d` (the delta) and, on the last one, `end` (the final
# status): a reader that finds `at` past what it has read knows entries were
# trimmed, and one before it that the text started over (a second attempt).
LUA_STREAM_ADD = """
local function stream_add(key, maxlen, ttl, ...)
  if redis.call('EXISTS', key) == 0 then return end
  redis.call('XADD', key, 'MAXLEN', maxlen, '*', ...)
  redis.call('EXPIRE', key, ttl)
end
"""

# A batch line's record names its batch's hash (`batch_counts`); each final
# transition of the line adds one to that hash's counter in the same script, so
# a batch's counts are exact and never need a scan of its lines. The hash's name
# comes from the record, not KEYS: the record is what says which batch a line
# belongs to (a client can't make its own request count towards a batch), and
# llmq runs on one Redis, not a cluster, so an undeclared key is safe here.
LUA_COUNT_LINE = """
local function count_line(record, counter)
  local counts = redis.call('HGET', record, 'batch_counts')
  if counts then redis.call('HINCRBY', counts, counter, 1) end
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
  redis.call('HDEL', KEYS[1], 'text')  -- a run taken over starts its text again
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

# KEYS: record, stream. ARGV: worker, delta, stream cap, stream ttl.
# The text generated so far grows by `delta` (GET shows it while the request
# runs), and so does the stream if watched. Returns 1, or 0 if this worker no
# longer holds the running claim.
PROGRESS = LUA_STREAM_ADD + """
local record = redis.call('HMGET', KEYS[1], 'status', 'worker', 'text')
if record[1] ~= 'running' or record[2] ~= ARGV[1] then return 0 end
local text = record[3] or ''
redis.call('HSET', KEYS[1], 'text', text .. ARGV[2])
stream_add(KEYS[2], ARGV[3], ARGV[4], 'at', #text, 'd', ARGV[2])
return 1
"""

# KEYS: record, done channel, stream. ARGV: ttl, result fields, fields to create a
# missing record with, id, stream cap, stream ttl. Returns 1 if written, 0 if the
# record was final. The stream's last entry holds the text not yet streamed.
FINISH = LUA_HSET_JSON + LUA_STREAM_ADD + LUA_COUNT_LINE + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'queued' and status ~= 'running' then return 0 end
if not status then hset_json(KEYS[1], ARGV[3]) end
local streamed = redis.call('HGET', KEYS[1], 'text') or ''
hset_json(KEYS[1], ARGV[2])
local text = redis.call('HGET', KEYS[1], 'text') or ''
local at, rest = #streamed, text:sub(#streamed + 1)
if text:sub(1, #streamed) ~= streamed then at, rest = 0, text end
local final = redis.call('HGET', KEYS[1], 'status')
stream_add(KEYS[3], ARGV[5], ARGV[6], 'at', at, 'd', rest, 'end', final)
if final ~= 'queued' and final ~= 'running' then count_line(KEYS[1], final == 'succeeded' and 'completed' or 'failed') end
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

# KEYS: record, done channel, cancel channel, stream. ARGV: now, ttl, id, stream cap, stream ttl.
# Returns 'cancelled' if this call cancelled it, the status if it was final, nil if unknown.
CANCEL = LUA_STREAM_ADD + LUA_COUNT_LINE + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'finish_reason', 'cancelled')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  local text = redis.call('HGET', KEYS[1], 'text') or ''
  stream_add(KEYS[4], ARGV[4], ARGV[5], 'at', #text, 'd', '', 'end', 'cancelled')
  count_line(KEYS[1], 'cancelled')
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  redis.call('PUBLISH', KEYS[3], ARGV[3])
  return 'cancelled'
end
return status
"""

# KEYS: record, stream. ARGV: stream cap, stream ttl.
# Starts a request's token stream (once) for a client about to watch it, with
# the text so far, so stream entries from here on continue it. Returns 1, or 0
# if there is no such record.
ATTACH = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
local record = redis.call('HMGET', KEYS[1], 'status', 'text')
if not record[1] then return 0 end
local entry = {'at', '0', 'd', record[2] or ''}
if record[1] ~= 'queued' and record[1] ~= 'running' then
  entry[5], entry[6] = 'end', record[1]
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], '*', unpack(entry))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: record, stream. Returns {text so far, id of the stream's last entry, its `end` or ''}:
# where a reader that lost its place picks up, consistent because every write
# to both is one script.
SNAPSHOT = """
local text = redis.call('HGET', KEYS[1], 'text') or ''
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if not last then return {text, '0-0', ''} end
local ended = ''
for i = 1, #last[2], 2 do
  if last[2][i] == 'end' then ended = last[2][i + 1] end
end
return {text, last[1], ended}
"""

# ---- batch lines and batches ---------------------------------------------------

# KEYS: record. ARGV: ttl, fields. Creates a batch line's record unless it exists
# (a resumed enqueue must not reset a line a worker has taken). Returns 'created',
# or the existing record's status.
CREATE_LINE = LUA_HSET_JSON + """
local status = redis.call('HGET', KEYS[1], 'status')
if status then return status end
hset_json(KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 'created'
"""

# KEYS: record, done channel, cancel channel, stream. ARGV: now, ttl, id, final
# status ('cancelled' or 'expired'), counter, error type, error message, fields to
# create a missing record with (a line never enqueued), '1' to leave a running
# line to finish, stream cap, stream ttl.
# Ends a line of a cancelled or expired batch; returns 1 if this call ended it.
SETTLE_LINE = LUA_HSET_JSON + LUA_STREAM_ADD + LUA_COUNT_LINE + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  hset_json(KEYS[1], ARGV[8])
  status = 'queued'
end
if status == 'queued' or (status == 'running' and ARGV[9] ~= '1') then
  redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[1], 'finish_reason', 'cancelled',
             'error_type', ARGV[6], 'error_message', ARGV[7])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  local text = redis.call('HGET', KEYS[1], 'text') or ''
  stream_add(KEYS[4], ARGV[10], ARGV[11], 'at', #text, 'd', '', 'end', ARGV[4])
  count_line(KEYS[1], ARGV[5])
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  redis.call('PUBLISH', KEYS[3], ARGV[3])
  return 1
end
return 0
"""

# KEYS: batch. ARGV: statuses it may move from (comma-separated), new status,
# fields to set (flat JSON array). Returns 1 if moved: a client's cancel and a
# gateway's step can't both win.
MOVE_BATCH = LUA_HSET_JSON + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for from in string.gmatch(ARGV[1], '[^,]+') do
  if from == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    hset_json(KEYS[1], ARGV[3])
    return 1
  end
end
return 0
"""

# KEYS: lease. ARGV: owner, milliseconds. Takes or renews the lease unless another
# owner holds it. Returns 1 if held.
TAKE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: owner. Lets the lease go, if still ours.
DROP_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: record (or batch hash). ARGV: ttl (0: keep the hash's own), fields (flat JSON),
# attempts to add to `webhook_attempts`, a field to set to ARGV[5] unless it is set
# ('' for none). Returns that field's value (or 1), or nil where the hash is gone.
# Written only into a hash that still exists: an HSET alone would recreate an expired
# one, without its TTL.
WEBHOOK_STATE = LUA_HSET_JSON + """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
hset_json(KEYS[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[1], 'webhook_attempts', ARGV[3]) end
local kept = 1
if ARGV[4] ~= '' then
  redis.call('HSETNX', KEYS[1], ARGV[4], ARGV[5])
  kept = redis.call('HGET', KEYS[1], ARGV[4])
end
if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return kept
"""

# ---- fine-tuning jobs (shared/store/fine_tuning.py) ----------------------------------

# KEYS: job hash. ARGV: trainer, lease (s), ttl (s). Leases run on Redis's clock. A trainer takes a job that
# is queued, or running under a lease that lapsed (its trainer died): status running,
# itself the owner, attempts + 1. Returns the attempt number; 0 if the job ended (or
# is gone); -1 if another trainer's lease on it is live.
CLAIM_TRAINING = LUA_NOW + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
local now = server_now()
if status == 'running' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  local until_ = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if owner ~= ARGV[1] and until_ > now then return -1 end
end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1], 'lease_until', tostring(now + tonumber(ARGV[2])))
redis.call('HSETNX', KEYS[1], 'started_at', math.floor(now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

# KEYS: job hash. ARGV: trainer, lease (s), fields (flat JSON). The owner renews
# its lease and writes its progress. Returns 1, plus 1 more if a cancel was asked for
# (2); 0: the job is no longer this trainer's (lease lost, or it ended).
RENEW_TRAINING = LUA_HSET_JSON + LUA_NOW + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', tostring(server_now() + tonumber(ARGV[2])))
hset_json(KEYS[1], ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 2 end
return 1
"""

# KEYS: job hash. A job whose files were checked moves to `queued`, unless it was
# cancelled meanwhile. Returns 1 if queued here.
QUEUE_TRAINING = """
if redis.call('HGET', KEYS[1], 'status') ~= 'validating_files' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued')
return 1
"""

# KEYS: job hash. ARGV: trainer ('' : any, for a job no trainer holds), status, fields
# (flat JSON), ttl (s). Ends a running (or queued) job, only for its owner: a trainer
# that lost its lease cannot also finish the job. Returns 1 if ended here.
END_TRAINING = LUA_HSET_JSON + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'queued' and status ~= 'validating_files' then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
hset_json(KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: job hash. ARGV: now (s), ttl (s). A job not started yet ends cancelled at once;
# a running one is marked for its trainer, which stops within a step. Returns the
# status it has now ('cancelled', 'running' (cancel asked), or the final one it had).
CANCEL_TRAINING = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if status == 'validating_files' or status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', math.floor(tonumber(ARGV[1])))
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'cancelled'
end
if status == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return status
"""
