defmodule Mix.Tasks.KumaTest do
  # The mix tasks for people who run a store: output, and exit codes a script can use.
  use Kuma.StoreCase, async: false

  @moduletag store: false

  setup %{dir: dir, name: name} do
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 4)
    for i <- 1..20, do: {:ok, _} = Kuma.append(store, "acct-#{rem(i, 5)}", {:deposited, i})
    assert eventually(fn -> Kuma.global_position(store) == {:ok, 20} end)
    :ok = Kuma.stop(store)

    Mix.shell(Mix.Shell.Process)
    on_exit(fn -> Mix.shell(Mix.Shell.IO) end)
    :ok
  end

  # Runs a task: {:ok | {:exit, code}, lines printed (info and error)}.
  defp task(name, args) do
    outcome =
      try do
        Mix.Task.rerun(name, args)
        :ok
      catch
        :exit, {:shutdown, code} -> {:exit, code}
      end

    {outcome, printed([])}
  end

  defp printed(acc) do
    receive do
      {:mix_shell, kind, [line]} when kind in [:info, :error] -> printed([line | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  test "kuma.verify: every chain intact, exit 0; a changed byte, exit 1 with the entity named", %{dir: dir} do
    {:ok, lines} = ok(task("kuma.verify", ["--data-dir", dir]))
    assert Enum.any?(lines, &(&1 =~ "shard 4/4"))
    assert List.last(lines) =~ "ok: 4 shards, 5 entities, 20 events"

    shard =
      Path.wildcard(Path.join(dir, "shards/*.kuma")) |> Enum.find(&(sqlite3(&1, "SELECT count(*) FROM events") != "0"))

    sqlite3(shard, "UPDATE events SET ts = ts + 1 WHERE pos = 1")
    assert {{:exit, 1}, lines} = task("kuma.verify", ["--data-dir", dir])
    assert Enum.any?(lines, &(&1 =~ "broken at seq 1"))
    assert List.last(lines) =~ "1 broken chain(s)"
  end

  test "kuma.stats prints the shards, positions and the store-wide order", %{dir: dir} do
    {:ok, lines} = ok(task("kuma.stats", ["--data-dir", dir]))
    assert Enum.any?(lines, &(&1 =~ "shards 4, sync normal, encryption on"))
    assert Enum.count(lines, &(&1 =~ ~r/^shard \d: last position \d+, \d+ bytes$/)) == 4
    assert Enum.any?(lines, &(&1 == "store-wide order: 20 events"))
  end

  test "kuma.export prints one entity, as a term or as JSON", %{dir: dir} do
    output =
      ExUnit.CaptureIO.capture_io(fn ->
        assert {:ok, _} = ok(task("kuma.export", ["acct-1", "--json", "--data-dir", dir]))
      end)

    assert output =~ "kuma-export-v1"
    assert output =~ "acct-1"
    output = ExUnit.CaptureIO.capture_io(fn -> ok(task("kuma.export", ["acct-2", "--data-dir", dir])) end)
    assert output =~ "entity_id: \"acct-2\""
  end

  test "kuma.erase asks first: a wrong answer erases nothing (exit 1), --yes erases", %{dir: dir, name: name} do
    send(self(), {:mix_shell_input, :prompt, "acct-x"})
    assert {{:exit, 1}, lines} = task("kuma.erase", ["acct-3", "--data-dir", dir])
    assert List.last(lines) =~ "not confirmed"

    send(self(), {:mix_shell_input, :prompt, "acct-3"})
    assert {:ok, [_ | _]} = ok(task("kuma.erase", ["acct-3", "--data-dir", dir]))
    assert {:ok, lines} = ok(task("kuma.erase", ["acct-4", "--yes", "--data-dir", dir]))
    assert List.last(lines) =~ "erased \"acct-4\": 4 events"

    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 4)
    assert {:error, :entity_erased} = Kuma.head(store, "acct-3")
    assert {:error, :entity_erased} = Kuma.head(store, "acct-4")
    assert {:ok, %{seq: 4}} = Kuma.head(store, "acct-1")
    Kuma.stop(store)
  end

  test "bad arguments and a missing store: exit 2 with the reason; --help prints the doc", %{dir: dir} do
    assert {{:exit, 2}, [line]} = task("kuma.verify", ["--data-dir", Path.join(dir, "nothing-here")])
    assert line =~ "no Kuma store"
    assert {{:exit, 2}, [line]} = task("kuma.stats", ["--bogus", "--data-dir", dir])
    assert line =~ "--bogus"
    assert {{:exit, 2}, _} = task("kuma.export", ["a", "b", "--data-dir", dir])
    assert {:ok, [doc]} = ok(task("kuma.erase", ["--help"]))
    assert doc =~ "Exit codes"
  end

  test "kuma.backup then kuma.restore: progress, a verified copy, exit 0; damage exits 1, nothing written",
       %{dir: dir, name: name} do
    backup = dir <> "-backup"
    target = dir <> "-restored"
    on_exit(fn -> File.rm_rf!(backup) && File.rm_rf!(target) end)

    {:ok, lines} = ok(task("kuma.backup", [backup, "--keystore", "--data-dir", dir]))
    assert Enum.any?(lines, &(&1 =~ ~r"^\d+/\d+ shard-003.seg: "))
    assert List.last(lines) =~ ~r"^ok: .* in \d+ segments \(4 shards, with the keystore\)"

    # A damaged copy of the backup: exit 1, the frame named, no data dir.
    damaged = dir <> "-damaged"
    File.cp_r!(backup, damaged)
    seg = Path.join(damaged, "shard-002.seg")
    File.write!(seg, binary_part(File.read!(seg), 0, 40))
    assert {{:exit, 1}, lines} = task("kuma.restore", [damaged, target])
    assert List.last(lines) =~ "shard-002.seg, frame"
    refute File.exists?(target)
    File.rm_rf!(damaged)

    {:ok, lines} = ok(task("kuma.restore", [backup, target]))
    assert Enum.any?(lines, &(&1 == "check 1/7 KUMA.seg"))
    assert Enum.any?(lines, &(&1 =~ "verify 4/4"))

    assert List.last(lines) =~
             "ok: 20 events of 5 entities in 4 shards, every chain verified, with the backup's keystore"

    {:ok, store} = Kuma.start(name: name, data_dir: target, shards: 4)
    assert {:ok, %{seq: 4}} = Kuma.head(store, "acct-1")
    Kuma.stop(store)

    # Over a data dir that holds a store: exit 2, nothing touched.
    assert {{:exit, 2}, [line]} = task("kuma.restore", [backup, target])
    assert line =~ "not empty"
    assert {{:exit, 2}, [line]} = task("kuma.restore", [backup])
    assert line =~ "BACKUP_DIR and DATA_DIR"
    assert {{:exit, 2}, [line]} = task("kuma.backup", [backup, "--data-dir", dir])
    assert line =~ "not empty"
  end

  defp ok({:ok, lines}), do: {:ok, lines}
  defp ok({other, lines}), do: flunk("task ended with #{inspect(other)}: #{Enum.join(lines, "\n")}")

  defp sqlite3(file, sql) do
    {out, 0} = System.cmd("sqlite3", [file, sql])
    String.trim(out)
  end
end
