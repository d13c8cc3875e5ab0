-- flowport's body check, in front of the gRPC-JSON transcoder.
--
-- The transcoder drops JSON keys that are not fields of the request message
-- (its parser ignores unknown fields, with no option to refuse them), so a
-- misspelt or wrongly nested key would silently do nothing. This filter
-- walks the body of each REST call that has one against the message it
-- becomes and answers 400, a JSON google.rpc.Status naming the keys, when
-- one is not a field. Free-form values (Struct, Value, Any, map keys) take
-- any key. It also refuses, naming the field, a list where the field holds
-- one value and an object where it holds a scalar: the transcoder would
-- name the enclosing message instead (or, for a map of strings, pass on
-- what the server cannot decode).
--
-- It fails closed: it sees what the transcoder sees. The path is matched as
-- the transcoder matches it (a trailing "/" or an empty segment still finds
-- the route), only what Envoy treats as gRPC (application/grpc, or
-- application/grpc+...) is left alone, and the walk reads what the
-- transcoder's JSON parser reads (\v and \f as whitespace, a trailing comma,
-- single quotes, bare keys). A body the walk cannot read is answered 400
-- here, naming the byte where it stops making sense, rather than passed on
-- unchecked.
--
-- Errors never quote the body: the transcoder's own parse errors quote the
-- 20 bytes around the problem (a secret's value, say), so its 400s are
-- rewritten on the way out (envoy_on_response) to say what is wrong and,
-- for a value it could not convert, which field, without the bytes.
--
-- It also refuses a query that gives a field of one value twice (see
-- "Query parameters" below): the transcoder would keep the last value.
-- And a body key for a field the path binds, unless it holds the path's very
-- value, or for a field the query sets too, or for a field of one value that
-- the same object of the body sets already, by its other name or the same
-- key again, or a key a map was given already (see "Fields set twice"
-- below): one of the values was dropped, and the path (and Envoy's access
-- log) could name one resource while the call acted on another.
--
-- TYPES, JSON_NAMES, ROUTES, VERBS and the QUERY_* tables are written in front
-- of this code by transcoder/body_fields.py, from the descriptor set:
--   TYPES[message] = { [json key] = kind }, a kind being "" (any JSON
--     value, not walked), "=" (one scalar: string, number, bool, null),
--     a message name, "map:" .. the kind of the map's values, or
--     "[]" .. the kind of a repeated field's elements (read into FIELDS below);
--   JSON_NAMES[message] = { [JSON name] = its field's proto name }, for each
--     JSON name that is not the proto name ("userId" = "user_id");
--   ROUTES = { { method, Lua pattern of the path, kind of the body,
--     request message, prefix of the fields the body sets ("" for body "*",
--     else "session."), { the field each captured variable binds (false: one
--     of several segments, not compared) }, BOUND or false } }, every route
--     that takes a body; BOUND[body key] = the field the path binds that the
--     key sets (its proto names), or the BOUND of the message it leads into,
--     for the fields the path binds that the body can set too (the pattern
--     captures the path's variables only then);
--   VERBS[verb] = true for each custom verb (":validate") of a route;
--   QUERY_TYPES[request message] = { [query name] = the field it sets (its
--     proto names, "session.user_id"), or false for a repeated field };
--   QUERY_ROUTES = { { method, Lua pattern of the path, request message,
--     { fields the path binds } } }, every REST route;
--   QUERY_SUSPECTS[name] = true for the names (lowercase, no "_") that have
--     a query checked even when given once: fields some path binds (and any
--     whose JSON name is not its proto name camel-cased).

local find, sub, match = string.find, string.sub, string.match

local MAX_REPORTED = 10 -- unknown keys named in one answer
local MAX_DEPTH = 64 -- nested messages walked; deeper ones are left to the transcoder
local SHOWN_BYTES = 200 -- how much of a key an answer quotes
-- Envoy's JSON local replies carry this header (transcoder/local_replies.py).
local LOCAL_REPLY_HEADER = "x-flowport-local-reply"
local MAX_LOCAL_MESSAGE_BYTES = 300
local ANY, SCALAR, REPEATED = "", "=", "[]"

-- FIELDS[message][json key] = { kind, proto name, how the field takes a second key, JSON
-- name, and from MARKS on the marks of the objects that set it }: one table per field, shared
-- by its two names. The third is REPEATED for a repeated field (the transcoder keeps the
-- elements of both), "map" for a map (it keeps the keys of both: one in both is a key given
-- twice), nil for a field of one value (it kept one of the two values: refused).
--
-- Each message object of the body the walk enters is numbered (`stamp`), and each field it
-- sets is marked in the field's entry, at the object's depth (so an object of the same message
-- nested inside it has marks of its own): a field that holds the object's own mark was set
-- already, by the name the mark's sign tells (+ proto, - JSON). So a key costs a read and a
-- write of its field's entry, and an object no table; a map's own mark is a table of the keys
-- its objects were given, with the stamp at [0]. (The walk never yields: no other request's
-- walk marks an entry while one is under way.)
local MARKS = 5
local FIELDS = {}
for message, keys in pairs(TYPES) do
  local renamed, by_name, fields = JSON_NAMES[message] or {}, {}, {}
  for key, kind in pairs(keys) do
    local name = renamed[key] or key
    local entry = by_name[name]
    if entry == nil then
      local again = (sub(kind, 1, 2) == REPEATED and REPEATED) or (sub(kind, 1, 4) == "map:" and "map") or nil
      entry = { kind, name, again, name, 0, 0, 0, 0, 0, 0, 0, 0 } -- marks at depths 1 to 8 in the array part
      by_name[name] = entry
    end
    if key ~= name then
      entry[4] = key
    end
    fields[key] = entry
  end
  FIELDS[message] = fields
end
local stamps = 0 -- the message objects walked so far

-- Where the walk stopped reading, and why (set just before a walk function returns nil).
local failed_at, failed_because = 1, ""

local function fail(i, because)
  failed_at, failed_because = i, because
  return nil
end

-- The transcoder's parser skips C's isspace(): \v and \f too.
local function skip_space(s, i)
  return find(s, "[^ \t\r\n\v\f]", i) or (#s + 1)
end

-- The value of the \u escape at i (its backslash), or nil when it is not four hex digits.
local function code_unit(s, i)
  local hex = match(s, "^\\u(%x%x%x%x)", i)
  return hex and tonumber(hex, 16)
end

-- The raw text of the string whose quote is at i, and the index after it.
-- Escapes are checked as the transcoder's parser checks them: \u takes four
-- hex digits and surrogates come in pairs; any other escaped byte stands for itself.
local function read_string(s, i)
  local stop = sub(s, i, i) == '"' and '["\\]' or "['\\]"
  local j = i + 1
  while true do
    local k = find(s, stop, j)
    if k == nil then
      return fail(#s + 1, "a string that does not end")
    end
    if sub(s, k, k) ~= "\\" then
      return sub(s, i + 1, k - 1), k + 1
    end
    j = k + 2
    if sub(s, k + 1, k + 1) == "u" then
      local code = code_unit(s, k)
      if code == nil then
        return fail(k, "an escape \\u without four hex digits")
      end
      j = k + 6
      if code >= 0xDC00 and code < 0xE000 then
        return fail(k, "a low surrogate escape without its high surrogate")
      elseif code >= 0xD800 and code < 0xDC00 then
        local low = code_unit(s, j)
        if low == nil or low < 0xDC00 or low >= 0xE000 then
          return fail(k, "a high surrogate escape without its low surrogate")
        end
        j = j + 6
      end
    end
  end
end

local ESCAPES = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t", v = "\v" }

local function utf8_char(code)
  if code < 0x80 then
    return string.char(code)
  elseif code < 0x800 then
    return string.char(0xC0 + math.floor(code / 64), 0x80 + code % 64)
  elseif code < 0x10000 then
    return string.char(0xE0 + math.floor(code / 4096), 0x80 + math.floor(code / 64) % 64, 0x80 + code % 64)
  end
  return string.char(
    0xF0 + math.floor(code / 262144), 0x80 + math.floor(code / 4096) % 64, 0x80 + math.floor(code / 64) % 64,
    0x80 + code % 64)
end

-- A key as the transcoder reads it: "\u0075ser_id" is user_id.
local function unescape(raw)
  if not find(raw, "\\", 1, true) then
    return raw
  end
  local out, i = {}, 1
  while true do
    local k = find(raw, "\\", i, true)
    if k == nil then
      out[#out + 1] = sub(raw, i)
      return table.concat(out)
    end
    out[#out + 1] = sub(raw, i, k - 1)
    local c = sub(raw, k + 1, k + 1)
    if c == "u" then
      local code = tonumber(sub(raw, k + 2, k + 5), 16) or 0xFFFD
      i = k + 6
      if code >= 0xD800 and code < 0xDC00 and sub(raw, i, i + 1) == "\\u" then
        local low = tonumber(sub(raw, i + 2, i + 5), 16)
        if low ~= nil and low >= 0xDC00 and low < 0xE000 then
          code, i = 0x10000 + (code - 0xD800) * 1024 + (low - 0xDC00), i + 6
        end
      end
      if code >= 0xD800 and code < 0xE000 then
        code = 0xFFFD -- a lone surrogate
      end
      out[#out + 1] = utf8_char(code)
    else
      out[#out + 1] = ESCAPES[c] or c
      i = k + 2
    end
  end
end

-- Whether `token` is a JSON number's shape: -?digits[.digits][(e|E)[+-]digits] ("1." too), read
-- left to right. As one pattern ("^%-?%d+%.?%d*$") a long run of digits followed by something else
-- was tried again from each digit: seconds of Envoy's CPU for 30,000 of them in a body.
local function is_number(token)
  local _, last = find(token, "^%-?%d+")
  if last == nil then
    return false
  end
  if sub(token, last + 1, last + 1) == "." then
    _, last = find(token, "^%d*", last + 2)
  end
  local e = sub(token, last + 1, last + 1)
  if e == "e" or e == "E" then
    _, last = find(token, "^[%+%-]?%d+", last + 2)
    if last == nil then
      return false
    end
  end
  return last == #token
end

-- Whether `token` is a literal or a number the transcoder's parser reads:
-- no NaN or Infinity, no "+", no leading "." and no leading zeros (it takes those as octal).
local function is_scalar(token)
  if token == "true" or token == "false" or token == "null" then
    return true
  end
  return is_number(token) and not find(token, "^%-?0%d")
end

-- The index after the value at i, whatever it holds; nil when it does not end.
local function skip_value(s, i)
  local c = sub(s, i, i)
  if c == '"' or c == "'" then
    local _, after = read_string(s, i)
    return after
  end
  if c ~= "{" and c ~= "[" then
    local stop = find(s, "[,}%] \t\r\n\v\f]", i) or (#s + 1)
    if not is_scalar(sub(s, i, stop - 1)) then
      return fail(i, stop == i and "a value missing" or "something that is not a JSON value")
    end
    return stop
  end
  local depth, j = 0, i
  while true do
    local k = find(s, "[\"'{}%[%]]", j)
    if k == nil then
      return fail(#s + 1, "an object or list that does not end")
    end
    local d = sub(s, k, k)
    if d == '"' or d == "'" then
      local _, after = read_string(s, k)
      if after == nil then
        return nil
      end
      j = after
    else
      depth = (d == "{" or d == "[") and depth + 1 or depth - 1
      j = k + 1
      if depth == 0 then
        return j
      end
    end
  end
end

local walk_value

-- A field the body sets that the path or the query set already, or that the body
-- gives twice: noted once per field (its proto names, from the request message),
-- with the keys that set it and how often the body did (`by` "path": to another
-- value than the path's; "query"; "body": the same object set it already; "key":
-- a map given `key` already, and the keys are the map's).
local function set_again(found, field, key, by)
  local again = found.again
  if again == nil then
    again = {}
    found.again = again
  end
  local seen = again[field]
  if seen == nil then
    if #again >= MAX_REPORTED then
      return
    end
    seen = { field = field, by = by, keys = {}, count = 1 }
    again[field] = seen
    again[#again + 1] = seen
  end
  if seen.keys[key] == nil and #seen.keys < MAX_REPORTED then
    seen.keys[key] = true
    seen.keys[#seen.keys + 1] = key
  end
  return seen
end

-- A field of one value that an object of the body sets again: `first` set it before.
-- One the path or the query set too is described as theirs already.
local function given_again(found, field, first, key)
  local seen = found.again and found.again[field]
  if seen ~= nil and seen.by ~= "body" then
    return
  end
  seen = set_again(found, field, first, "body")
  if seen ~= nil then
    set_again(found, field, key, "body")
    seen.count = seen.count + 1
  end
end

-- Whether the value at i is a string that is, read as the transcoder reads it,
-- exactly `value` (the path's, decoded; nil: none is the path's).
local function is_string_of(s, i, value)
  local q = sub(s, i, i)
  if value == nil or (q ~= '"' and q ~= "'") then
    return false
  end
  local raw = read_string(s, i)
  return raw ~= nil and unescape(raw) == value
end

-- The members of the object at i: each key must be a field of `fields`
-- (nil: any key, a map's), each value is walked as its field's kind. `bound`
-- (nil for most bodies) holds the keys here that set a field the path binds;
-- `query` (nil unless the query sets a field the body can) the query's fields.
-- `proto` is the object's field by proto names from the request message
-- ("session", "workflow.nodes[0]"; "" for the request itself), which names a
-- field set twice; `keys`, for a map, the keys its field was given already.
local function walk_object(s, i, fields, map_kind, path, found, depth, bound, query, proto, keys)
  local j = skip_space(s, i + 1)
  if sub(s, j, j) == "}" then
    return j + 1
  end
  stamps = stamps + 1
  local stamp, slot = stamps, MARKS + depth - 1
  while true do
    local key, after
    local q = sub(s, j, j)
    if q == '"' or q == "'" then
      key, after = read_string(s, j)
      if key == nil then
        return nil
      end
      key = unescape(key)
    else
      -- The transcoder's parser also takes bare keys.
      key = match(s, "^[%w_$]+", j)
      if key == nil then
        return fail(j, "a key missing")
      end
      after = j + #key
    end
    j = skip_space(s, after)
    if sub(s, j, j) ~= ":" then
      return fail(j, "no ':' after a key")
    end
    j = skip_space(s, j + 1)
    local where, kind, inner, inner_proto, inner_keys
    if fields == nil then
      where, kind = path .. "[" .. key .. "]", map_kind
      if keys[key] then
        set_again(found, proto, key, "key")
      else
        keys[key] = true
      end
      if kind ~= SCALAR and kind ~= ANY then
        inner_proto = proto .. "[" .. key .. "]"
      end
    else
      local entry = fields[key]
      where = path == "" and key or (path .. "." .. key)
      if entry == nil then
        if #found.unknown < MAX_REPORTED then
          found.unknown[#found.unknown + 1] = where
        end
        kind = ANY
      else
        kind = entry[1]
        if bound ~= nil then
          inner = bound[key]
          if type(inner) == "string" then
            if not is_string_of(s, j, found.path_values[inner]) then
              set_again(found, inner, key, "path")
            end
            inner = nil
          end
        end
        if query ~= nil then
          local field = query.types[query.prefix .. where]
          if field and query.fields[field] then
            set_again(found, field, key, "query")
          end
        end
        -- After the path's and the query's checks: a field they name is theirs to describe.
        local again, mark = entry[3], entry[slot]
        if again == nil then
          if mark == stamp or mark == -stamp then
            local field = proto == "" and entry[2] or (proto .. "." .. entry[2])
            given_again(found, field, mark > 0 and entry[2] or entry[4], key)
          else
            entry[slot] = key == entry[2] and stamp or -stamp
          end
        elseif again == "map" then
          if type(mark) ~= "table" or mark[0] ~= stamp then
            mark = { [0] = stamp }
            entry[slot] = mark
          end
          inner_keys = mark
        end
        if kind ~= SCALAR and kind ~= ANY then
          inner_proto = proto == "" and entry[2] or (proto .. "." .. entry[2])
        end
      end
    end
    j = walk_value(s, j, kind, where, found, depth, inner, query, inner_proto, inner_keys)
    if j == nil then
      return nil
    end
    j = skip_space(s, j)
    local d = sub(s, j, j)
    if d == "}" then
      return j + 1
    elseif d ~= "," then
      return fail(j, "no ',' or '}' after a value")
    end
    j = skip_space(s, j + 1)
    if sub(s, j, j) == "}" then
      return j + 1 -- the parser takes a trailing comma
    end
  end
end

-- A value of the wrong shape for its field: noted (the first few), then skipped.
local function misshapen(s, i, path, found, description)
  if #found.misshapen < MAX_REPORTED then
    found.misshapen[#found.misshapen + 1] = { path, description }
  end
  return skip_value(s, i)
end

-- The value at i, of `kind`; `proto` and `keys` as walk_object takes them (nil where not walked into).
walk_value = function(s, i, kind, path, found, depth, bound, query, proto, keys)
  local c = sub(s, i, i)
  if kind == ANY or depth > MAX_DEPTH or (c ~= "{" and c ~= "[") then
    return skip_value(s, i)
  end
  local element = match(kind, "^%[%](.*)$")
  if c == "[" then
    if element == nil then
      local holds = kind == SCALAR and "one value" or "an object"
      return misshapen(s, i, path, found, "a list, where " .. holds .. " belongs")
    end
    -- A repeated field: each element is of its kind (an array in an array is no field's).
    local j, n = skip_space(s, i + 1), 0
    if sub(s, j, j) == "]" then
      return j + 1
    end
    local walked = element ~= SCALAR and element ~= ANY
    while true do
      local at = path .. "[" .. n .. "]"
      if sub(s, j, j) == "[" then
        j = skip_value(s, j)
      else
        j = walk_value(s, j, element, at, found, depth + 1, nil, nil, walked and (proto .. "[" .. n .. "]") or nil)
      end
      if j == nil then
        return nil
      end
      j = skip_space(s, j)
      local d = sub(s, j, j)
      if d == "]" then
        return j + 1
      elseif d ~= "," then
        return fail(j, "no ',' or ']' after a list's element")
      end
      j, n = skip_space(s, j + 1), n + 1
      if sub(s, j, j) == "]" then
        return j + 1 -- the parser takes a trailing comma
      end
    end
  end
  -- An object: the transcoder takes one for a repeated field as its only element.
  kind = element or kind
  if kind == SCALAR then
    return misshapen(s, i, path, found, "an object, where one value (a string, number, true, false or null) belongs")
  end
  local map_kind = match(kind, "^map:(.*)$")
  if map_kind ~= nil then
    return walk_object(s, i, nil, map_kind, path, found, depth + 1, nil, nil, proto, keys or {})
  end
  local fields = FIELDS[kind]
  if fields == nil then
    return skip_value(s, i)
  end
  -- The query's fields are followed into messages, not into repeated ones (it sets none there).
  return walk_object(s, i, fields, nil, path, found, depth + 1, bound, element == nil and query or nil, proto)
end

local function continuation(b)
  return b ~= nil and b >= 128 and b < 192
end

-- At most SHOWN_BYTES of `text`, whole characters, and how many characters it has.
local function prefix(text)
  local characters = select(2, string.gsub(text, "[^\128-\191]", ""))
  if #text <= SHOWN_BYTES then
    return text, characters, false
  end
  local stop = SHOWN_BYTES
  while stop > 0 and continuation(string.byte(text, stop + 1)) do
    stop = stop - 1
  end
  return sub(text, 1, stop), characters, true
end

-- As the server's errors quote a value: 'abc' or 'abc…' (40000 characters, cut).
local function shown(text)
  local start, characters, was_cut = prefix(text)
  if not was_cut then
    return "'" .. start .. "'"
  end
  return "'" .. start .. "\226\128\166' (" .. characters .. " characters, cut)"
end

-- At most SHOWN_BYTES of `text`, marked as cut when it was longer.
local function cut(text)
  local start, characters, was_cut = prefix(text)
  return was_cut and (start .. "\226\128\166 (" .. characters .. " characters, cut)") or start
end

-- `text` as the inside of a JSON string: escaped, and bytes that are not UTF-8 as U+FFFD.
local function json_text(text)
  local out, i, n = {}, 1, #text
  while i <= n do
    local b = string.byte(text, i)
    if b < 32 or b == 34 or b == 92 then
      out[#out + 1] = string.format("\\u%04x", b)
      i = i + 1
    elseif b < 128 then
      out[#out + 1] = string.char(b)
      i = i + 1
    else
      local size = (b >= 240 and b < 245) and 4 or (b >= 224 and b < 240) and 3 or (b >= 194 and b < 224) and 2 or 0
      local ok = size > 0 and i + size - 1 <= n
      for k = i + 1, i + size - 1 do
        if not continuation(string.byte(text, k)) then
          ok = false
        end
      end
      -- No overlong forms, surrogates or code points past U+10FFFF.
      local second = string.byte(text, i + 1) or 0
      if (b == 224 and second < 160) or (b == 237 and second >= 160) or (b == 240 and second < 144)
        or (b == 244 and second >= 144) then
        ok = false
      end
      if ok then
        out[#out + 1] = sub(text, i, i + size - 1)
        i = i + size
      else
        out[#out + 1] = "\239\191\189"
        i = i + 1
      end
    end
  end
  return table.concat(out)
end

-- Answers 400 with a JSON google.rpc.Status (marked, so the local reply
-- mappers in transcoder/local_replies.py leave its body as it is).
local function refuse(request_handle, body)
  request_handle:streamInfo():dynamicMetadata():set("flowport", "json_reply", true)
  request_handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, body)
end

-- A google.rpc.Status as JSON, of `code` (3 when nil): its message, an ErrorInfo, and a
-- BadRequest when `violations` (each { field, description }) has any.
local function status_json(message, reason, domain, metadata, violations, code)
  local info = '{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"' .. reason .. '","domain":"'
    .. domain .. '","metadata":{' .. (metadata or "") .. "}}"
  local rows = {}
  for i, violation in ipairs(violations or {}) do
    rows[i] = '{"field":"' .. json_text(cut(violation[1])) .. '","description":"' .. json_text(violation[2]) .. '"}'
  end
  local bad_request = #rows > 0 and (',{"@type":"type.googleapis.com/google.rpc.BadRequest","field_violations":['
    .. table.concat(rows, ",") .. "]}") or ""
  return '{"code":' .. (code or 3) .. ',"message":"' .. json_text(message) .. '","details":[' .. info .. bad_request
    .. "]}"
end

-- A body the walk cannot read: the transcoder would refuse it too, or read
-- keys the walk never saw, so it is refused here either way. It names the
-- byte (counted from 0) where reading stopped, never what is there.
local function unreadable(request_handle, method, path, at, because)
  local message = "the body of " .. method .. " " .. cut(path) .. " is not valid JSON: " .. because
    .. " at byte " .. (at - 1)
  refuse(request_handle, status_json(message, "INVALID_JSON", "flowport.dev", '"offset":"' .. (at - 1) .. '"'))
end

local function unknown_fields(request_handle, method, path, body_kind, unknown)
  local names, violations = {}, {}
  for i, where in ipairs(unknown) do
    names[i] = shown(where)
    violations[i] = { where, "not a field of " .. body_kind .. "; unknown fields are refused, not ignored" }
  end
  local message = "unknown field" .. (#unknown > 1 and "s " or " ") .. table.concat(names, ", ")
    .. " in the body of " .. method .. " " .. cut(path)
  local metadata = '"message_type":"' .. body_kind .. '"'
  refuse(request_handle, status_json(message, "UNKNOWN_FIELD", "flowport.dev", metadata, violations))
end

local function misshapen_fields(request_handle, method, path, misshapen)
  local parts = {}
  for i, problem in ipairs(misshapen) do
    parts[i] = (problem[1] == "" and "the body" or shown(problem[1])) .. " is " .. problem[2]
  end
  local message = table.concat(parts, "; ") .. " (in the body of " .. method .. " " .. cut(path) .. ")"
  refuse(request_handle, status_json(message, "INVALID_ARGUMENT", "flowport.dev", "", misshapen))
end

-- Envoy's own test (Grpc::Common::hasGrpcContentType): exactly application/grpc, or application/grpc+...
-- grpc-web requests reach this filter as application/grpc (the grpc_web filter comes first).
local function is_grpc(content_type)
  return content_type == "application/grpc" or sub(content_type, 1, 17) == "application/grpc+"
end

-- The path as the transcoder matches it (grpc-httpjson-transcoding's
-- ExtractRequestParts): no query; a known custom verb split off at the last
-- ":" after the last "/"; trailing empty segments dropped. So
-- "/api/workflows/:validate" is "/api/workflows:validate" and "/api/sessions/"
-- is "/api/sessions"; an empty segment stays, and matches a variable.
-- Also returns the verb split off (":validate"), or "" when none was.
local function canonical(path)
  path = match(path, "^[^?]*")
  local verb = ""
  -- Anchored: unanchored, a path with no ":" is tried from each of its characters (seconds for 32 KB).
  local colon, slash = match(path, "^.*():"), match(path, "^.*()/")
  if colon ~= nil and (slash == nil or colon > slash) and VERBS[sub(path, colon + 1)] then
    verb = sub(path, colon)
    path = sub(path, 1, colon - 1)
  end
  -- Trailing "/" dropped from the end back ("/+$" was tried again from each "/" of a long run).
  local last = #path
  while last > 0 and string.byte(path, last) == 47 do
    last = last - 1
  end
  return sub(path, 1, last) .. verb, verb
end

-- Query parameters.
--
-- The transcoder binds each `name=value` pair of a query (a pair without
-- "=", or with nothing before it, is skipped) to the field `name` names:
-- parts separated by ".", each a field's proto or JSON name ("page_size",
-- "pageSize") once percent-decoded ("page%5Fsize"; "+" stays "+"). Every
-- pair sets the field again, after the path's variables: a field of one
-- value given twice kept the last value, silently, and one the path binds
-- took the query's. Such a query is refused here (grpc-gateway's "too many
-- values for field"), naming each field and never a value; a repeated field
-- takes every value, as before. A name the transcoder does not know is left
-- to it (its own 400), and so is a field inside a repeated message or a map.
--
-- Cheap first: only a request with a query reads it, and only when two of its
-- names are alike (lowercase, "_" left out: page_size, pageSize and
-- page%5Fsize are all "pagesize") or one is a QUERY_SUSPECTS name is its route
-- found and each name resolved to the field it sets.

-- A query name as the transcoder reads it: "%XX" decoded, after the name is cut
-- at its dots; so an encoded "." (%2E) is part of a name no field has, and is
-- left encoded here to match none either.
local function decode_name(name)
  return (string.gsub(name, "%%(%x%x)", function(hex)
    local char = string.char(tonumber(hex, 16))
    if char ~= "." then
      return char
    end
  end))
end

-- The query's names, decoded, and whether the query needs the full check.
local function query_names(query)
  local names, seen, suspect = {}, {}, false
  for pair in string.gmatch(query, "[^&]+") do
    local equals = find(pair, "=", 1, true)
    if equals ~= nil and equals > 1 then
      local name = sub(pair, 1, equals - 1)
      if find(name, "%", 1, true) then
        name = decode_name(name)
      end
      local key = string.lower((string.gsub(name, "_", "")))
      if seen[key] or QUERY_SUSPECTS[key] then
        suspect = true
      end
      seen[key] = true
      names[#names + 1] = name
    end
  end
  return names, suspect
end

-- Each field of one value that the query (with the path) sets more than once,
-- as { field, description }, and the request message; nil when there is none.
local function fields_set_twice(method, path, names, suspect)
  if not suspect then
    return nil
  end
  local matched, route = canonical(path), nil
  for _, candidate in ipairs(QUERY_ROUTES) do
    if candidate[1] == method and find(matched, candidate[2]) then
      route = candidate
      break
    end
  end
  if route == nil then
    return nil -- no REST route: the transcoder's 404
  end
  local fields, counts, spellings, order = QUERY_TYPES[route[3]], {}, {}, {}
  for _, name in ipairs(names) do
    local field = fields[name]
    if field then
      if counts[field] == nil then
        order[#order + 1] = field
        counts[field], spellings[field] = 0, {}
      end
      counts[field] = counts[field] + 1
      if spellings[field][name] == nil then
        spellings[field][name] = true
        spellings[field][#spellings[field] + 1] = "'" .. name .. "'"
      end
    end
  end
  local bound = {}
  for _, field in ipairs(route[4]) do
    bound[field] = true
  end
  local found = {}
  for _, field in ipairs(order) do
    local count = counts[field]
    local as = #spellings[field] > 1 and (" (as " .. table.concat(spellings[field], " and ") .. ")") or ""
    local description = nil
    if bound[field] then
      description = "set by the path and " .. (count == 1 and "again" or (count .. " times")) .. " by the query" .. as
    elseif count > 1 then
      description = "given " .. count .. " times in the query" .. as
    end
    if description ~= nil and #found < MAX_REPORTED then
      found[#found + 1] = { field, description .. ", where one value belongs" }
    end
  end
  if #found == 0 then
    return nil
  end
  return found, route[3]
end

local function fields_given_twice(request_handle, found, message_type)
  local parts = {}
  for i, problem in ipairs(found) do
    parts[i] = shown(problem[1]) .. " is " .. problem[2]
  end
  local message = table.concat(parts, "; ")
  local metadata = '"message_type":"' .. message_type .. '"'
  refuse(request_handle, status_json(message, "INVALID_ARGUMENT", "flowport.dev", metadata, found))
end

-- Fields set twice: by the path or the query and again by the body, or twice by the body.
--
-- The transcoder weaves the path's variables and the query's parameters into
-- the body it parses, and a key of the body for the same field won (with the
-- field's proto name; its JSON name lost to the path): `POST
-- /workflows/wfa/execute` with {"workflow_id": "wfb"} ran wfb, `PUT
-- /api/secrets/A` with {"name": "B", ...} wrote B, `POST /api/keys/A:revoke`
-- with {"key_id": "B"} revoked B, while the path and Envoy's access log named
-- A. So a body key (by either name) for a field the path binds is refused,
-- naming the field, unless its value is a string that is exactly the path's
-- (percent-decoded, as the transcoder decodes a variable of one segment):
-- clients that send the whole resource, its id too, still work. Every field a
-- path binds here is a string (tests/unit/test_edge_config.py checks); for
-- another type only a JSON string of the path's very text would be taken,
-- which the transcoder reads as the path's value too.
--
-- A query parameter for a field of one value that the body sets too lost to
-- the body's (or won over it, by the JSON names), silently: `POST
-- /api/executions?workflow_id=wfb` with {"workflow_id": "wfa"} ran wfa. Such a
-- body is refused, naming the field, whatever the two values. A repeated
-- field takes the values of both, as before.
--
-- And within the body: an object that gives a field of one value twice, by
-- both its names or the same key again ({"workflow_id": "wfa", "workflowId":
-- "wfb"} ran wfb, {"user_id": "a", "user_id": "b"} made b's session), had
-- one of the values dropped; a message or a Struct given twice was merged
-- into one, the second's fields winning. Such a body is refused, naming the
-- field by its proto names from the request message ("session.user_id",
-- "workflow.nodes[1].retry.max_attempts"), whatever the values. So is a map
-- given a key twice: in one object the transcoder refused it itself (quoting
-- the key), and in a map given twice ({"labels": {"a": "1"}, "labels": {"a":
-- "2"}}) it kept the last; the map is named, and the key shown as an unknown
-- key is (cut when long), never its values. A repeated field given twice
-- takes the elements of both, and a map given twice the keys of both, as the
-- transcoder does. (A key given twice inside a Struct, which the walk does
-- not enter, the transcoder still refuses itself.)
--
-- Cheap: a route whose path binds no field the body can set has no BOUND, and
-- a request whose query sets no field under the body walks without the
-- query's fields; with either, a key costs a lookup (BOUND's: per key of the
-- top level and of the messages leading to a bound field), and only a key
-- that sets such a field reads its value again. A field given twice costs a
-- read and a write of its FIELDS entry per key (see FIELDS), and a map a
-- table per map and an insert per key.

-- A path's variable of one segment as the transcoder binds it: every "%XX"
-- decoded ("%2F" too), "+" left as it is.
local function decode_segment(segment)
  if not find(segment, "%", 1, true) then
    return segment
  end
  return (string.gsub(segment, "%%(%x%x)", function(hex)
    return string.char(tonumber(hex, 16))
  end))
end

-- The path's value of each field the body can set too, by field: nil for a variable of several segments.
local function path_values(matched, route)
  local values, captures = {}, { match(matched, route[2]) }
  for k, field in ipairs(route[6]) do
    if field and captures[k] ~= nil then
      values[field] = decode_segment(captures[k])
    end
  end
  return values
end

-- The fields of one value under the body that the query sets (as a set; nil when there is none).
local function query_fields(route, names)
  local fields, prefix, set = QUERY_TYPES[route[4]], route[5], nil
  for _, name in ipairs(names) do
    local field = fields and fields[name]
    if field and sub(field, 1, #prefix) == prefix then
      set = set or {}
      set[field] = true
    end
  end
  return set
end

-- As { field, description }: what fields_given_twice names.
local function set_again_problems(again)
  local found = {}
  for i, seen in ipairs(again) do
    local last = match(seen.field, "^.*%.(.*)$") or seen.field -- after its last "."
    local spellings = {}
    for k, key in ipairs(seen.keys) do
      -- A map's keys are the caller's own words: quoted as an unknown key is, cut when long.
      spellings[k] = seen.by == "key" and shown(key) or ("'" .. key .. "'")
    end
    local as = (#seen.keys > 1 or seen.keys[1] ~= last) and (" (as " .. table.concat(spellings, " and ") .. ")") or ""
    local description
    if seen.by == "key" then
      description = "given the key" .. (#seen.keys > 1 and "s " or " ") .. table.concat(spellings, " and ")
        .. " more than once, where each key holds one value"
    elseif seen.by == "path" then
      description = "set by the path and again by the body" .. as .. ", to another value, where one value belongs"
    elseif seen.by == "query" then
      description = "set by the query and again by the body" .. as .. ", where one value belongs"
    else
      description = "given " .. seen.count .. " times in the body" .. as .. ", where one value belongs"
    end
    found[i] = { seen.field, description }
  end
  return found
end

-- The methods REST routes take on `path`, as an Allow header lists them ("DELETE, GET");
-- nil when no route has the path.
local function methods_allowed(path)
  local matched, verb = canonical(path)
  local seen, found = {}, {}
  -- The transcoder matches a path it split a custom verb off with that verb's routes only, and
  -- any other with the routes without one: "/api/executions/x:cancel" is not "/api/executions/{id}"
  -- with id "x:cancel", and "/api/executions/x:cancel/" is not a cancel.
  for _, route in ipairs(QUERY_ROUTES) do
    local pattern = route[2]
    local route_verb = match(pattern, "(:[^:/]*)%$$")
    if route_verb ~= nil and not VERBS[sub(route_verb, 2)] then
      route_verb = nil
    end
    if not seen[route[1]] and find(matched, pattern) and (route_verb or "") == verb then
      seen[route[1]] = true
      found[#found + 1] = route[1]
    end
  end
  if #found == 0 then
    return nil
  end
  table.sort(found)
  return table.concat(found, ", ")
end

-- A HEAD of a path that REST routes have (none takes HEAD): 405 with their methods, as the
-- other methods get (envoy_on_response); Envoy's 404 to a HEAD has no body to find the path in.
local function refuse_head(request_handle, path)
  local allowed = methods_allowed(path)
  if allowed == nil then
    return -- no route has the path: the transcoder's 404
  end
  request_handle:streamInfo():dynamicMetadata():set("flowport", "json_reply", true)
  request_handle:respond({ [":status"] = "405", ["content-type"] = "application/json", allow = allowed }, "")
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local method = headers:get(":method")
  local full_path = headers:get(":path") or ""
  if method == "HEAD" then
    refuse_head(request_handle, match(full_path, "^[^?]*"))
    return
  end
  local question = find(full_path, "?", 1, true)
  local has_query = question ~= nil and question < #full_path
  local has_body = method == "POST" or method == "PUT" or method == "PATCH"
  if not has_query and not has_body then
    return
  end
  if is_grpc(headers:get("content-type") or "") then
    return
  end
  local path = match(full_path, "^[^?]*")
  local names = nil
  if has_query then
    local suspect
    names, suspect = query_names(sub(full_path, question + 1))
    local found, message_type = fields_set_twice(method, path, names, suspect)
    if found ~= nil then
      fields_given_twice(request_handle, found, message_type)
      return
    end
    if not has_body then
      return
    end
  end
  local matched = canonical(path)
  local route = nil
  for _, candidate in ipairs(ROUTES) do
    if candidate[1] == method and find(matched, candidate[2]) then
      route = candidate
      break
    end
  end
  if route == nil or route[3] == ANY then
    return
  end
  local body_kind = route[3]
  local body = request_handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  local text = body:getBytes(0, body:length())
  local found = { unknown = {}, misshapen = {} }
  local bound, query = route[7] or nil, nil
  if bound ~= nil then
    found.path_values = path_values(matched, route)
  end
  if names ~= nil and #names > 0 then
    local fields = query_fields(route, names)
    if fields ~= nil then
      query = { types = QUERY_TYPES[route[4]], prefix = route[5], fields = fields }
    end
  end
  -- A body field's object is named by that field ("session"), the request's by nothing.
  local proto = sub(route[5], 1, -2)
  local after = walk_value(text, skip_space(text, 1), body_kind, "", found, 0, bound, query, proto)
  if after ~= nil and skip_space(text, after) <= #text then
    -- The transcoder's parser stops after one value and refuses what follows.
    after = fail(skip_space(text, after), "more after the JSON value")
  end
  if after == nil then
    unreadable(request_handle, method, path, failed_at, failed_because)
  elseif #found.unknown > 0 then
    unknown_fields(request_handle, method, path, body_kind, found.unknown)
  elseif #found.misshapen > 0 then
    misshapen_fields(request_handle, method, path, found.misshapen)
  elseif found.again ~= nil then
    fields_given_twice(request_handle, set_again_problems(found.again), route[4])
  end
end

-- How many characters the JSON string content `raw` stands for.
local function characters_of(raw)
  local n = #raw - select(2, string.gsub(raw, "[\128-\191]", ""))
  n = n - 5 * select(2, string.gsub(raw, "\\u%x%x%x%x", ""))
  return n - select(2, string.gsub(raw, "\\[^u]", ""))
end

-- The start of a local reply's raw message, marked as cut like the server's
-- errors: whole escapes and whole characters only.
local function cut_raw(raw)
  local i = 1
  while i <= MAX_LOCAL_MESSAGE_BYTES do
    local step = 1
    if sub(raw, i, i) == "\\" then
      step = sub(raw, i + 1, i + 1) == "u" and 6 or 2
    end
    if i + step - 1 > MAX_LOCAL_MESSAGE_BYTES then
      break
    end
    i = i + step
  end
  while i > 1 and continuation(string.byte(raw, i)) do
    i = i - 1
  end
  return sub(raw, 1, i - 1) .. "\226\128\166 (" .. characters_of(raw) .. " characters, cut)"
end

-- A type as the transcoder names it, for people: TYPE_STRING is string,
-- type.googleapis.com/google.protobuf.Duration is google.protobuf.Duration.
local function type_name(name)
  local scalar = match(name, "^TYPE_([%u%d]+)$")
  if scalar ~= nil then
    return string.lower(scalar)
  end
  return match(name, "^type%.googleapis%.com/(.+)$") or name
end

-- What a JSON value of these types looks like, for the error of one that is not.
local FORMAT_HINTS = {
  ["google.protobuf.Duration"] = ' (a string of seconds such as "3600s" or "0.5s")',
  ["google.protobuf.Timestamp"] = ' (an RFC 3339 string such as "2026-01-31T00:00:00Z")',
}

-- The transcoder's 400 for a body it could not read, as a JSON google.rpc.Status
-- that quotes none of the body; nil for any other message.
--   Its parser: "<what>\n<the 20 bytes before and after>\n<spaces>^".
--   Its converter: "<field path>: invalid value <the value, or why> for type <type>", where
--   the why of a Duration or Timestamp is "Field '<name>', <why>[, value is <the value>]".
local function transcoder_error(message)
  local what = match(message, "^([^\n]*)\n.*\n *%^$")
  if what ~= nil then
    what = string.lower(sub(what, 1, 1)) .. string.gsub(sub(what, 2), "%.$", "")
    return status_json("the request body is not valid JSON: " .. cut(what), "INVALID_JSON", "flowport.dev")
  end
  -- A query parameter the call does not have: named as the server names an unknown body field.
  local parameter = match(message, '^Could not find field "(.*)" in the type "[%w_.]+"%.$')
  if parameter ~= nil then
    local description = "not a parameter of this call (its parameters are in /openapi.json)"
    return status_json("unknown query parameter " .. shown(parameter) .. ": " .. description, "UNKNOWN_FIELD",
      "flowport.dev", '"field":"' .. json_text(cut(parameter)) .. '"', { { parameter, description } })
  end
  -- The field before the first ": invalid value ", the type after the last " for type ": found by
  -- position (one pattern went through the rest again at each ": invalid value " in the message).
  local at = find(message, ": invalid value ", 1, true)
  local rest = at and sub(message, at + 16)
  local value, kind = nil, nil
  if rest then
    value, kind = match(rest, "^(.*) for type (%S+)$")
  end
  if value == nil then
    return nil
  end
  local field = sub(message, 1, at - 1)
  -- Only the converter's own words are kept, never what the body held.
  local why = match(value, "^Field '[^']*', (.-), value is ") or match(value, "^Field '[^']*', (.*)$")
  local description = "not a valid " .. type_name(kind) .. (why and (": " .. cut(why)) or "")
    .. (FORMAT_HINTS[type_name(kind)] or "")
  local shown_field = field == "" and "the body" or shown(field)
  return status_json(shown_field .. " is " .. description, "INVALID_ARGUMENT", "flowport.dev", "",
    { { field, description } })
end

-- Envoy's own replies: a 400 of the transcoder about the body is rewritten
-- (transcoder_error); its 404 for a path that a route has, with another
-- method, is 405 with an Allow header (grpc-gateway answers 501 there);
-- any other that quotes the request (an unknown query parameter) keeps the
-- start of its message, marked as cut like the server's.
function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  if headers:get(LOCAL_REPLY_HEADER) == nil then
    return
  end
  headers:remove(LOCAL_REPLY_HEADER)
  local status = headers:get(":status")
  local is_400 = status == "400"
  local length = tonumber(headers:get("content-length") or "")
  if not is_400 and status ~= "404" and length ~= nil and length <= MAX_LOCAL_MESSAGE_BYTES + 200 then
    return
  end
  -- From here on the headers are not touched: their handle does not outlive body()
  -- (Envoy: "object used outside of proper scope"), and setBytes sets content-length.
  local body = response_handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  local start = find(text, '"message":"', 1, true)
  if start == nil then
    return
  end
  local open = start + 10
  local raw, after = read_string(text, open)
  if raw == nil then
    return
  end
  local unrouted = status == "404" and match(unescape(raw), "^Could not resolve (.*) to a method%.$")
  if unrouted then
    local allowed = methods_allowed(unrouted)
    if allowed == nil then
      body:setBytes(status_json("no REST route has the path " .. shown(unrouted)
        .. " (the REST API is described at /openapi.json)", "NOT_FOUND", "envoy.flowport.dev", nil, nil, 5))
      return
    end
    local message = "this method is not allowed on " .. shown(unrouted) .. "; it takes " .. allowed
    body:setBytes(status_json(message, "METHOD_NOT_ALLOWED", "envoy.flowport.dev", '"allow":"' .. allowed .. '"', nil,
      12))
    -- A new handle: headers may change once body() returns (they wait for it), through one got now.
    local after = response_handle:headers()
    after:replace(":status", "405")
    after:replace("allow", allowed)
    return
  end
  local rewritten = is_400 and transcoder_error(unescape(raw))
  if rewritten then
    body:setBytes(rewritten)
  elseif #raw > MAX_LOCAL_MESSAGE_BYTES then
    body:setBytes(sub(text, 1, open) .. cut_raw(raw) .. sub(text, after - 1))
  end
end
