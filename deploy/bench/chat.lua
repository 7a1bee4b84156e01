-- wrk script: POST an OpenAI chat request. BODY_BYTES (env) pads the prompt to that size.
local size = tonumber(os.getenv("BODY_BYTES") or "0")
local prompt = "Say hello."
if size > 200 then prompt = string.rep("x", size - 120) end
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"' .. prompt .. '"}],"max_tokens":16}'
