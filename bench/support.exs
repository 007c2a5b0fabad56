# Shared pieces of the benchmark suite: machine facts, the ceiling binary, progress lines.

defmodule Kuma.Bench.Machine do
  @moduledoc false

  def facts do
    %{
      cores: :erlang.system_info(:logical_processors),
      schedulers: :erlang.system_info(:schedulers_online),
      memory_gib: mem_gib(),
      cpu: cpu_model(),
      os: os(),
      otp: :erlang.system_info(:otp_release) |> to_string(),
      erts: :erlang.system_info(:version) |> to_string(),
      elixir: System.version(),
      rust: cmd("rustc", ["--version"]),
      sqlite: Kuma.Bench.Ceiling.sqlite_version(),
      disk: cmd("df", ["-h", System.tmp_dir!()]) |> String.split("\n") |> List.last()
    }
  end

  defp mem_gib do
    with {:ok, text} <- File.read("/proc/meminfo"),
         [_, kb] <- Regex.run(~r/MemTotal:\s+(\d+) kB/, text) do
      Float.round(String.to_integer(kb) / 1024 / 1024, 1)
    else
      _ -> nil
    end
  end

  defp cpu_model do
    with {:ok, text} <- File.read("/proc/cpuinfo"), [_, m] <- Regex.run(~r/model name\s*:\s*(.+)/, text) do
      m
    else
      _ -> "unknown"
    end
  end

  defp os do
    case File.read("/etc/os-release") do
      {:ok, text} -> Regex.run(~r/PRETTY_NAME="([^"]+)"/, text, capture: :all_but_first) |> List.wrap() |> List.first()
      _ -> "unknown"
    end
  end

  def cmd(bin, args) do
    case System.find_executable(bin) do
      nil ->
        "not found"

      path ->
        {out, _} = System.cmd(path, args, stderr_to_stdout: true)
        String.trim(out)
    end
  end
end

defmodule Kuma.Bench.Ceiling do
  @moduledoc false
  # Runs native/kuma_ceiling (raw rusqlite, no BEAM, no hashing) with W1's parameters.

  @root Path.expand("..", __DIR__)

  def binary do
    path = Path.join(@root, "target/release/kuma_ceiling")
    cargo = System.find_executable("cargo") || Path.expand("~/.cargo/bin/cargo")
    {_, 0} = System.cmd(cargo, ["build", "--release", "-q", "-p", "kuma_ceiling"], cd: @root, stderr_to_stdout: true)
    path
  end

  def sqlite_version do
    case run(events: 1000, entities: 10, shards: 1, layout: "plain") do
      %{"sqlite" => v} -> v
      _ -> "unknown"
    end
  end

  def run(opts) do
    dir = Path.join(System.tmp_dir!(), "kuma_ceiling_#{System.unique_integer([:positive])}")

    args = Enum.flat_map(opts, fn {k, v} -> ["--#{k}", to_string(v)] end) ++ ["--dir", dir]

    {out, 0} = System.cmd(binary(), args, stderr_to_stdout: true)
    File.rm_rf!(dir)
    # One line of flat JSON: pick the fields with a regex (no JSON parser without hex).
    Regex.scan(~r/"(\w+)":("([^"]*)"|[-\d.]+)/, out)
    |> Map.new(fn
      [_, k, _, s] when s != "" -> {k, s}
      [_, k, v | _] -> {k, parse_num(v)}
    end)
  end

  defp parse_num(v) do
    if String.contains?(v, "."), do: String.to_float(v), else: String.to_integer(v)
  end
end

defmodule Kuma.Bench.Progress do
  @moduledoc false
  # Prints "<label>: 42% (420,000 events, 310,000 ev/s)" about once a second; with
  # `{:seconds, s}` as the total (time-bound workloads) "<label>: 12 s of 30 (...)".

  def start(label, total, counter) do
    parent = self()
    t0 = System.monotonic_time(:millisecond)

    spawn_link(fn -> loop(parent, label, total, counter, t0) end)
  end

  defp loop(parent, label, total, counter, t0) do
    receive do
      :stop -> :ok
    after
      1000 ->
        done = :counters.get(counter, 1)
        secs = max(System.monotonic_time(:millisecond) - t0, 1) / 1000
        IO.puts("  #{label}: #{done_part(total, done, secs)} (#{fmt(done)} events, #{fmt(round(done / secs))} ev/s)")
        loop(parent, label, total, counter, t0)
    end
  end

  defp done_part({:seconds, s}, _done, secs), do: "#{round(secs)} s of #{s}"
  defp done_part(total, done, _secs) when total > 0, do: "#{round(done * 100 / total)}%"
  defp done_part(_total, _done, _secs), do: "0%"

  def stop(pid), do: send(pid, :stop)

  def fmt(n) when is_integer(n) do
    n |> Integer.to_string() |> String.reverse() |> String.replace(~r/(\d{3})(?=\d)/, "\\1,") |> String.reverse()
  end

  def fmt(n) when is_float(n), do: :erlang.float_to_binary(n, decimals: 1)
end

defmodule Kuma.Bench.Writers do
  @moduledoc false
  # `writers` concurrent processes share `calls` calls of `call.()`, each writing
  # `per_call` events, with a progress line. Writer w makes calls w, w+W, w+2W, ... and
  # seeds :rand with its number, so runs are repeatable. Returns elapsed microseconds.

  alias Kuma.Bench.Progress

  def run(label, writers, calls, per_call, call) do
    counter = :counters.new(1, [:write_concurrency])
    progress = Progress.start(label, calls * per_call, counter)

    {micros, _} =
      :timer.tc(fn ->
        1..writers
        |> Enum.map(fn w ->
          Task.async(fn ->
            :rand.seed(:exsss, {w, 17, 31})

            for _ <- 1..Range.size(w..calls//writers)//1 do
              call.()
              :counters.add(counter, 1, per_call)
            end
          end)
        end)
        |> Task.await_many(:infinity)
      end)

    Progress.stop(progress)
    micros
  end
end

defmodule Kuma.Bench.Table do
  @moduledoc false
  # Small helpers for the printed tables.

  def pad(s), do: String.pad_leading(to_string(s), 15)
  def verdict(true), do: "met"
  def verdict(false), do: "MISSED"

  # Percentiles of a list of numbers (sorted here).
  def percentiles(values, ps) do
    sorted = Enum.sort(values)
    n = length(sorted)
    Map.new(ps, fn p -> {p, Enum.at(sorted, min(n - 1, trunc(p * n)))} end)
  end
end

defmodule Kuma.Bench.Account do
  @moduledoc false
  # The aggregate of the entity workloads: every deposit is one 200-byte event.
  @behaviour Kuma.Aggregate

  @impl true
  def init(_id), do: 0

  @impl true
  def handle(_count, {:deposit, event}), do: {:ok, [event]}

  @impl true
  def apply(count, _event), do: count + 1
end

defmodule Kuma.Bench.Stores do
  @moduledoc false
  # Throwaway stores for the workloads, deleted afterwards.

  def with_store(opts, fun) do
    dir = Path.join(System.tmp_dir!(), "kuma_bench_#{System.unique_integer([:positive])}")
    name = :"kuma_bench_#{System.unique_integer([:positive])}"

    defaults = [
      name: name,
      data_dir: dir,
      shards: 16,
      aggregates: [Kuma.Bench.Account],
      master_key: :crypto.strong_rand_bytes(32)
    ]

    {:ok, store} = Kuma.start(Keyword.merge(defaults, opts))

    try do
      fun.(store)
    after
      Kuma.stop(store)
      File.rm_rf!(dir)
    end
  end
end

defmodule Kuma.Bench.Payload do
  @moduledoc false

  # A {:deposited, binary} event whose term_to_binary is exactly `bytes` long.
  def event(bytes) do
    overhead = byte_size(:erlang.term_to_binary({:deposited, <<>>}))
    {:deposited, :binary.copy("x", bytes - overhead)}
  end
end
