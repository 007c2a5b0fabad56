# Runs the Gleam bank (examples/gleam_bank: an account aggregate and the transfer saga,
# written in Gleam) against a real store:
#
#     mix run examples/gleam_bank/run.exs [--data-dir DIR]
#
# Needs `gleam` (v1.17.0, the last whose output loads on OTP 25) on PATH: Mix's kuma_gleam
# compiler then builds gleam/ and this example before anything runs.

{opts, _, _} = OptionParser.parse(System.argv(), strict: [data_dir: :string])
dir = Path.expand(Keyword.get(opts, :data_dir, "data/gleam_bank"))

# The store is encrypted: without KUMA_MASTER_KEY, the demo's key file (as bin/demo).
if System.get_env("KUMA_MASTER_KEY") in [nil, ""],
  do: System.put_env("KUMA_MASTER_KEY", String.trim(File.read!(Kuma.IEx.demo_key_file())))

cond do
  System.find_executable("gleam") == nil ->
    IO.puts("The Gleam bank needs the gleam compiler (v1.17.0) on PATH; it is not here.")
    System.halt(2)

  not Code.ensure_loaded?(:gleam_bank) ->
    IO.puts("gleam is on PATH but the example was not built (run mix compile and look for errors).")
    System.halt(2)

  true ->
    case :gleam_bank.run(dir) do
      {:ok, {:summary, completed, compensated, total}} ->
        IO.puts("Gleam bank in #{dir}: #{completed} transfers completed, #{compensated} compensated; total of all balances #{total}")

      {:error, reason} ->
        IO.puts("Gleam bank failed: #{inspect(reason)}")
        System.halt(1)
    end
end
