# wrk as the benchmarks' load tool (Debian's wrk). Sourced, not run.

# Runs wrk (one thread) with a Lua script against URL at CONCURRENCY for DURATION;
# prints "requests/s p50_ms p99_ms non2xx".
kiln_wrk_measure() { # LUA URL CONCURRENCY DURATION
  local out
  out="$(wrk -t1 -c"$3" -d"$4" --latency -s "$1" "$2" 2>&1)"
  local rps p50 p99 bad
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
  p50="$(awk '$1=="50%" {print $2}' <<<"$out")"
  p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
  bad="$(awk '/Non-2xx/ {print $5}' <<<"$out")"
  echo "$rps $(kiln_wrk_ms "$p50") $(kiln_wrk_ms "$p99") ${bad:-0}"
}

# wrk's 1.23ms / 456.00us / 1.02s in milliseconds.
kiln_wrk_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else print v }'
}

# Writes WORK/NAME.lua, with which wrk POSTs WORK/NAME.bin as a KServe v2 binary
# request (its JSON header's length from WORK/NAME.len; scripts/kserve_bodies.py
# writes both).
kiln_wrk_body_lua() { # WORK NAME
  cat >"$1/$2.lua" <<LUA
wrk.method = "POST"
local f = io.open("$1/$2.bin", "rb")
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "$(cat "$1/$2.len")"
LUA
}
