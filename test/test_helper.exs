# Stores encrypt by default and take their master key from KUMA_MASTER_KEY unless given
# one: tests (and the child VMs they start, which inherit the environment) use this one.
System.put_env("KUMA_MASTER_KEY", String.duplicate("6b", 32))

# Tests that need a program from outside the BEAM skip, with one line saying so, where it
# is missing (bin/setup installs python's prometheus_client and chromium; gleam it cannot).
available? = fn cmd, args ->
  try do
    match?({_, 0}, System.cmd(cmd, args, stderr_to_stdout: true))
  rescue
    ErlangError -> false
  end
end

skips = [
  {:prometheus, available?.("python3", ["-c", "import prometheus_client"]),
   "the Prometheus parse test: python3 with prometheus_client is missing (bin/setup installs it)"},
  {:chromium, System.find_executable("chromium") != nil || System.find_executable("chromium-browser") != nil,
   "the monitor page browser test: chromium is missing (bin/setup installs it)"},
  {:gleam, System.find_executable("gleam") != nil,
   "the Gleam package's tests: no gleam compiler on PATH (none is in a registry reachable here; Gleam v1.17.0 is the one for OTP 25)"}
]

for {_tag, false, why} <- skips, do: IO.puts("skipping #{why}")
ExUnit.start(capture_log: true, exclude: for({tag, false, _} <- skips, do: tag))
