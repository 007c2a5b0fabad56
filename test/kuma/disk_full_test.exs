defmodule Kuma.DiskFullTest do
  # A full disk under the shards or under the keystore: whatever fails changes nothing,
  # whatever was acknowledged stays, and the store recovers by itself when space returns.
  # Each test mounts a small tmpfs, so they need root (and skip with one line otherwise).
  use Kuma.StoreCase, async: false

  @moduletag store: false
  @moduletag timeout: 120_000

  setup_all do
    case System.cmd("id", ["-u"]) do
      {"0\n", 0} -> :ok
      _ -> {:ok, skip: "needs root to mount a small tmpfs (the disk-full tests)"}
    end
  end

  setup context do
    if reason = context[:skip] do
      IO.puts("skipping #{context.test}: #{reason}")
      {:ok, skip: true}
    else
      mount = context.dir <> "-tmpfs"
      File.mkdir_p!(mount)
      {_, 0} = System.cmd("mount", ["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", mount])

      on_exit(fn ->
        System.cmd("umount", ["-l", mount])
        File.rm_rf(mount)
      end)

      %{mount: mount}
    end
  end

  # Fills the volume of `dir` to the last byte.
  defp fill(dir) do
    filler = Path.join(dir, "filler")
    System.cmd("dd", ["if=/dev/zero", "of=#{filler}", "bs=64k"], stderr_to_stdout: true)
    filler
  end

  defp free(filler), do: File.rm!(filler)

  test "a delete that fails on a full disk changes nothing, in memory or on disk", %{mount: mount, name: name} = ctx do
    unless ctx[:skip] do
      data = Path.join(mount, "data")
      opts = [name: name, data_dir: data, shards: 1, keystore_path: Path.join(ctx.dir, "keystore.kuma")]
      {:ok, store} = Kuma.start(opts)
      for i <- 1..20, do: {:ok, _} = Kuma.append(store, "victim", {:e, i, String.duplicate("v", 500)})
      {:ok, _} = Kuma.append(store, "bystander", :e)
      filler = fill(mount)

      case Kuma.delete(store, "victim") do
        {:error, {:storage, _context, message}} ->
          assert message =~ "full"
          # Nothing moved: the entity reads as before, also after a restart with space back.
          assert {:ok, events} = Kuma.events(store, "victim")
          assert length(events) == 20
          free(filler)
          :ok = Kuma.flush(store)
          :ok = Kuma.stop(store)
          {:ok, store} = Kuma.start(opts)
          assert {:ok, false} = Kuma.erased?(store, "victim")
          assert {:ok, %{events: 20}} = Kuma.verify(store, "victim")
          assert {:ok, %{entities: 2, events: 21}} = Kuma.verify_store(store)
          # And deleting again, with space, erases it.
          assert {:ok, %{events_deleted: 20}} = Kuma.delete(store, "victim")
          :ok = Kuma.stop(store)

        {:ok, %{events_deleted: 20}} ->
          flunk("the delete found room on a full volume: the test cannot provoke the failure here")
      end
    end
  end

  test "a keystore on a full disk fails only the erasure, and it is finished when space returns",
       %{mount: mount, name: name} = ctx do
    unless ctx[:skip] do
      keystore = Path.join(mount, "keystore.kuma")
      opts = [name: name, data_dir: ctx.dir, shards: 1, keystore_path: keystore]
      {:ok, store} = Kuma.start(opts)
      for i <- 1..5, do: {:ok, _} = Kuma.append(store, "carol", {:e, i})
      {:ok, _} = Kuma.append(store, "dave", :one)
      filler = fill(mount)

      # Writers alongside the erasure: their answers must be the truth.
      writer = Task.async(fn -> for i <- 1..50, do: Kuma.append(store, "dave", {:e, i}) end)
      deleted = Kuma.delete(store, "carol")
      answers = Task.await(writer)
      acknowledged = Enum.count(answers, &match?({:ok, _}, &1))

      assert {:error, {:storage, _, message}} = deleted
      assert message =~ "full"
      # The erasure committed: carol's events are gone; the shard goes on.
      assert {:error, :entity_erased} = Kuma.events(store, "carol")
      assert {:ok, n} = Kuma.append(store, "dave", :after)
      assert n == 1 + acknowledged + 1, "every append answered :ok is stored, and only those"

      # Space returns: the writer finishes the erasure by itself, no call needed.
      free(filler)
      # (Two keys, carol's and dave's, until carol's is destroyed.)
      assert eventually(fn -> keys_in(keystore) == 1 end, 100, 50)
      :ok = Kuma.stop(store)
      {:ok, store} = Kuma.start(opts)
      assert {:ok, true} = Kuma.erased?(store, "carol")
      assert {:ok, %{events: events}} = Kuma.verify(store, "dave")
      assert events == n
      :ok = Kuma.stop(store)
    end
  end

  test "appends on a full disk fail clearly, and the store recovers by itself with nothing lost",
       %{mount: mount, name: name} = ctx do
    unless ctx[:skip] do
      opts = [name: name, data_dir: Path.join(mount, "data"), shards: 2, keystore_path: Path.join(ctx.dir, "ks.kuma")]
      {:ok, store} = Kuma.start(opts)
      filler = fill(mount)
      payload = String.duplicate("p", 2_000)

      results = for i <- 1..400, do: {i, Kuma.append(store, "e#{rem(i, 10)}", {:e, i, payload})}
      failures = for {_, {:error, reason}} <- results, do: reason
      assert failures != [], "the full volume refused nothing"
      assert Enum.all?(failures, &match?({:storage, _, _}, &1))
      acknowledged = for {i, {:ok, _}} <- results, do: i

      free(filler)
      # No restart: the next appends succeed.
      assert eventually(fn -> match?({:ok, _}, Kuma.append(store, "after", :e)) end, 50, 100)
      for i <- 401..450, do: {:ok, _} = Kuma.append(store, "e#{rem(i, 10)}", {:e, i, payload})
      :ok = Kuma.stop(store)

      {:ok, store} = Kuma.start(opts)
      stored = for n <- 0..9, {:ok, events} = Kuma.events(store, "e#{n}"), %{data: {:e, i, _}} <- events, do: i
      assert Enum.sort(stored) == Enum.sort(acknowledged ++ Enum.to_list(401..450))
      assert {:ok, _} = Kuma.verify_store(store)
      :ok = Kuma.stop(store)
    end
  end

  # How many data keys the keystore holds (read behind Kuma's back).
  defp keys_in(keystore) do
    {out, 0} = System.cmd("sqlite3", [keystore, "SELECT count(*) FROM keys;"])
    out |> String.trim() |> String.to_integer()
  end
end
