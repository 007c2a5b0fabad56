defmodule Kuma.TelemetryTest do
  # Kuma's telemetry events (Kuma.Telemetry): each documented event is emitted with its
  # measurements and metadata; attach/detach behave as :telemetry's do.
  use Kuma.StoreCase, async: false

  @moduletag store_opts: [aggregates: [Bank.Account]]

  setup %{name: name} do
    parent = self()
    id = {:kuma_test, make_ref()}

    :ok =
      Kuma.Telemetry.attach(
        id,
        Kuma.Telemetry.events(),
        fn event, measurements, metadata, store ->
          # Other tests' stores emit too: only ours.
          if metadata[:store] == store, do: send(parent, {:telemetry, event, measurements, metadata})
        end,
        name
      )

    on_exit(fn -> Kuma.Telemetry.detach(id) end)
    %{handler: id}
  end

  test "every event Kuma.Telemetry.events/0 lists is in its documented table" do
    {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(Kuma.Telemetry)
    for event <- Kuma.Telemetry.events(), do: assert(doc =~ "| `#{inspect(event)}` |", inspect(event))
  end

  @tag store_opts: [aggregates: [Bank.Account], snapshot_every: 2]
  test "batches, snapshots (an entity's and a framework's) and passivations are reported", %{store: store, name: name} do
    {:error, {:partial, _}} = Kuma.append_batch(store, [{"b-1", [1, 2]}, {"b-2", [3]}, {"b-1", [4], expected_seq: 0}])

    assert_receive {:telemetry, [:kuma, :append_batch, :stop], %{entries: 2, failed: 1, events: 3, bytes: b},
                    %{store: ^name}}

    assert b > 0

    alice = Kuma.entity(store, Bank.Account, "snap-1")
    {:ok, 1} = Kuma.execute(alice, {:deposit, 5})
    {:ok, 2} = Kuma.execute(alice, {:deposit, 5})

    assert_receive {:telemetry, [:kuma, :snapshot, :stop], %{seq: 2, bytes: bytes, duration: _},
                    %{entity_id: "snap-1", version: 1}}

    assert bytes > 0

    :ok = Kuma.save_snapshot(store, "b-1", 2, %{framework: :state})
    assert_receive {:telemetry, [:kuma, :snapshot, :stop], %{seq: 2}, %{entity_id: "b-1", version: 0}}

    :ok = Kuma.passivate(alice)
    assert_receive {:telemetry, [:kuma, :entity, :passivate], %{}, %{store: ^name, aggregate: Bank.Account}}
  end

  test "appends, entity writes, loads, erasures and projection batches are reported", %{store: store, name: name} do
    {:ok, 2} = Kuma.append(store, "t-1", [{:a, 1}, {:a, 2}])
    assert_receive {:telemetry, [:kuma, :append, :stop], %{duration: d, events: 2, bytes: b}, meta}
    assert is_integer(d) and d > 0 and b > 0
    assert %{store: ^name, entity_id: "t-1", shard: shard} = meta
    assert is_integer(shard)

    assert {:error, _} = Kuma.append(store, "t-1", {:a, 3}, expected_seq: 0)
    assert_receive {:telemetry, [:kuma, :append, :exception], %{duration: _}, %{reason: {:wrong_expected_seq, 0, 2}}}

    account = Kuma.entity(store, Bank.Account, "acct-t")
    {:ok, _} = Kuma.execute(account, {:deposit, 5})
    assert_receive {:telemetry, [:kuma, :load, :stop], %{replayed: 0}, %{entity_id: "acct-t", aggregate: Bank.Account}}
    assert_receive {:telemetry, [:kuma, :execute, :stop], %{events: 1, writes: 1, duration: _}, %{entity_id: "acct-t"}}

    {:ok, _} = Kuma.execute(account, {:deposit, 5})
    :ok = Kuma.Entity.passivate(account)
    assert Kuma.read(account).balance == 10
    assert_receive {:telemetry, [:kuma, :load, :stop], %{replayed: 2}, %{snapshot_seq: 0}}

    {:ok, _sub} = Kuma.subscribe(store, from: :start)
    assert_receive {:telemetry, [:kuma, :projection, :batch], %{events: n, lag: lag}, %{kind: :subscription}}
    assert n >= 1 and lag >= 0

    {:ok, _} = Kuma.delete(store, "t-1")
    assert_receive {:telemetry, [:kuma, :erase, :stop], %{events: 2}, %{store: ^name}}
  end

  test "writes taken together by a busy entity are one execute event", %{store: store} do
    account = Kuma.entity(store, Bank.Account, "busy")
    Kuma.read(account)
    {:ok, %{pid: pid}} = Kuma.Entity.info(account)
    :sys.suspend(pid)
    tasks = for _ <- 1..5, do: Task.async(fn -> Kuma.execute(account, {:deposit, 1}) end)
    assert eventually(fn -> Process.info(pid, :message_queue_len) == {:message_queue_len, 5} end)
    :sys.resume(pid)
    Task.await_many(tasks)
    assert_receive {:telemetry, [:kuma, :execute, :stop], %{events: 5, writes: 5}, %{entity_id: "busy"}}
  end

  test "attach and detach", %{handler: id} do
    assert {:error, :already_exists} = Kuma.Telemetry.attach(id, [[:kuma, :x]], fn _, _, _, _ -> :ok end, nil)
    assert :ok = Kuma.Telemetry.detach(id)
    assert {:error, :not_found} = Kuma.Telemetry.detach(id)
  end

  test "a handler that raises is detached, the others go on", %{store: store} do
    id = {:raiser, make_ref()}
    :ok = Kuma.Telemetry.attach(id, [:kuma, :append, :stop], fn _, _, _, _ -> raise "boom" end, nil)
    {:ok, _} = Kuma.append(store, "r", {:a, 1})
    assert_receive {:telemetry, [:kuma, :append, :stop], _, _}
    assert {:error, :not_found} = Kuma.Telemetry.detach(id)
  end
end
