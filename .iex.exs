# `iex -S mix` in this repository: starts the demo store on ./data (KUMA_DATA_DIR to pick
# another) with its monitor, and imports the helpers of Kuma.IEx.
import Kuma.IEx

case Kuma.IEx.start_demo(System.get_env("KUMA_DATA_DIR", "data")) do
  {:ok, store} -> IO.puts(Kuma.IEx.banner(store))
  {:error, reason} -> IO.puts("Kuma: the demo store did not start: " <> Kuma.format_error(reason))
end

IEx.configure(default_prompt: "kuma(%counter)>")
