defmodule Kuma.CrashTest do
  # Promise 1: an acknowledged append survives `kill -9` of the VM.
  use Kuma.StoreCase, async: false

  @moduletag store: false
  @moduletag timeout: 120_000

  # Runs in a separate BEAM: 8 writers append to random entities with sync: :full and print
  # "ACK <id> <seq>" after every acknowledged append.
  @child_script ~S"""
  [dir] = System.argv()
  {:ok, _} = Application.ensure_all_started(:kuma)
  {:ok, store} = Kuma.start(name: :crash, data_dir: dir, shards: 4, sync: :full)
  IO.puts("PID #{System.pid()}")

  for w <- 1..8 do
    spawn(fn ->
      Stream.iterate(0, &(&1 + 1))
      |> Enum.each(fn i ->
        id = "acct-#{rem(i * 8 + w, 200)}"
        {:ok, seq} = Kuma.append(store, id, [{:deposited, w, i}, {:noted, w, i}])
        IO.puts("ACK #{id} #{seq}")
      end)
    end)
  end

  Process.sleep(:infinity)
  """

  test "every append the child acknowledged is there after kill -9 and reopen", %{dir: dir, name: name} do
    script = Path.join(System.tmp_dir!(), "kuma_crash_child_#{System.unique_integer([:positive])}.exs")
    File.write!(script, @child_script)
    on_exit(fn -> File.rm(script) end)

    ebin = Path.join(Mix.Project.app_path(), "ebin")
    elixir = System.find_executable("elixir")

    port =
      Port.open({:spawn_executable, elixir}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["-pa", ebin, script, dir]
      ])

    os_pid = read_pid(port)
    # Let the writers get going, then kill the VM in the middle of writes.
    acks = collect_acks(port, %{}, 2_000)
    {_, 0} = System.cmd("kill", ["-9", os_pid])
    acks = drain(port, acks)
    assert map_size(acks) > 50, "the child acknowledged too little to prove anything: #{map_size(acks)}"

    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 4, sync: :full)

    for {id, acked_seq} <- acks do
      {:ok, events} = Kuma.events(store, id)
      assert length(events) >= acked_seq, "#{id}: acknowledged seq #{acked_seq}, found #{length(events)}"
      assert Enum.map(events, & &1.seq) == Enum.to_list(1..length(events))
      # Appends are atomic: every append wrote two events, so no stream has an odd length.
      assert rem(length(events), 2) == 0
      assert {:ok, _} = Kuma.verify(store, id)
    end

    assert {:ok, _} = Kuma.verify_store(store)
    # The store accepts writes after recovery, continuing every chain.
    {id, _} = Enum.at(acks, 0)
    {:ok, %{seq: seq}} = Kuma.head(store, id)
    assert {:ok, _} = Kuma.append(store, id, :after_crash, expected_seq: seq)
  end

  defp read_pid(port) do
    receive do
      {^port, {:data, {:eol, "PID " <> pid}}} -> pid
      {^port, {:data, _other}} -> read_pid(port)
      {^port, {:exit_status, status}} -> flunk("child exited early with #{status}")
    after
      60_000 -> flunk("child did not start")
    end
  end

  defp collect_acks(port, acks, min) do
    if map_size(acks) >= 150 and Enum.sum(Map.values(acks)) >= min do
      acks
    else
      receive do
        {^port, {:data, {:eol, line}}} -> collect_acks(port, record(line, acks), min)
        {^port, {:exit_status, status}} -> flunk("child exited early with #{status}")
      after
        60_000 -> flunk("child stopped acknowledging")
      end
    end
  end

  defp drain(port, acks) do
    receive do
      {^port, {:data, {:eol, line}}} -> drain(port, record(line, acks))
      {^port, {:data, {:noeol, _partial}}} -> drain(port, acks)
      {^port, {:exit_status, _}} -> acks
    after
      10_000 -> acks
    end
  end

  defp record("ACK " <> rest, acks) do
    [id, seq] = String.split(rest, " ")
    Map.update(acks, id, String.to_integer(seq), &max(&1, String.to_integer(seq)))
  end

  defp record(_line, acks), do: acks
end
