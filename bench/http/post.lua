-- wrk -s post.lua URL -- BODYFILE : POSTs the multipart body in BODYFILE
local body_file
function init(args) body_file = args[1] end
function request()
  if not wrk.body_loaded then
    local f = io.open(body_file, "rb"); wrk.body = f:read("*a"); f:close(); wrk.body_loaded = true
  end
  return wrk.format("POST", nil, {["Content-Type"] = "multipart/form-data; boundary=sdx4benchboundary"}, wrk.body)
end
