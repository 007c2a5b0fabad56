defmodule Kuma.Entity.LoaderTest do
  # Kuma.Entity.Loader: state = latest valid snapshot + the events after it, up to a
  # target seq; a snapshot that does not describe the stored history is ignored.
  use Kuma.StoreCase, async: true

  alias Bank.Account
  alias Bank.Account.Deposited
  alias Kuma.{EventLog, Store}
  alias Kuma.Entity.Loader

  @moduletag store_opts: [aggregates: [Account, Bank.AccountV2], snapshot_every: 10]

  defp deposits(store, id, n) do
    entity = Kuma.entity(store, Account, id)
    for i <- 1..n, do: {:ok, ^i} = Kuma.execute(entity, {:deposit, 1})
    :ok = Kuma.flush(store)
    # Snapshots are written fire-and-forget: wait until the last one is there.
    want = div(n, 10)
    assert eventually(fn -> match?({:ok, l} when length(l) == want, Kuma.Native.read_snapshots(store.native, id)) end)
    :ok = Kuma.passivate(entity)
  end

  test "an entity with no events loads as init/1 at seq 0", %{store: store} do
    assert {:ok, %{state: %Account{id: "fresh", balance: 0}, seq: 0, hash: nil, replayed: 0}} =
             Loader.load(store, Account, "fresh")
  end

  test "a load starts from the latest snapshot at or before the target", %{store: store} do
    deposits(store, "a", 25)
    assert {:ok, %{seq: 25, snapshot_seq: 20, replayed: 5, state: %{balance: 25}}} = Loader.load(store, Account, "a")

    assert {:ok, %{seq: 15, snapshot_seq: 10, replayed: 5, state: %{balance: 15}}} =
             Loader.load(store, Account, "a", 15)

    assert {:ok, %{seq: 9, snapshot_seq: 0, replayed: 9}} = Loader.load(store, Account, "a", 9)
    assert {:ok, %{seq: 25}} = Loader.load(store, Account, "a", 1_000)
    {:ok, %{hash: head_hash}} = Kuma.head(store, "a")
    assert {:ok, %{hash: ^head_hash}} = Loader.load(store, Account, "a")
  end

  test "a snapshot of another version is ignored", %{store: store} do
    deposits(store, "b", 12)
    assert {:ok, %{snapshot_seq: 0, replayed: 12, state: %{balance: 12}}} = Loader.load(store, Bank.AccountV2, "b")
  end

  test "a snapshot whose hash is not the stored event's is ignored", %{store: store} do
    deposits(store, "c", 10)
    {:ok, s} = Store.lookup(store.name)
    forged = :erlang.term_to_binary(%Account{id: "c", balance: 999, version: 5})
    # Of the head, the writer itself refuses a snapshot with the wrong hash...
    :ok = EventLog.snapshot(s, "c", 10, 1, :crypto.strong_rand_bytes(32), forged)
    assert_receive {:kuma_reply, _, {:error, {:invalid, :snapshot, _}}}
    # ...of an older event it cannot tell, so the loader checks it against the chain.
    :ok = EventLog.snapshot(s, "c", 5, 1, :crypto.strong_rand_bytes(32), forged)
    assert_receive {:kuma_reply, _, {:ok, :ok}}
    assert {:ok, %{snapshot_seq: 0, replayed: 7, state: %{balance: 7}}} = Loader.load(store, Account, "c", 7)
  end

  test "an event apply/2 cannot fold fails the load, naming its seq", %{store: store} do
    {:ok, _} = Kuma.append(store, "d", [%Deposited{amount: 1}, %Deposited{amount: :not_a_number}])
    assert {:error, {:replay_failed, 2, message}} = Loader.load(store, Account, "d")
    assert message =~ "ArithmeticError"
  end

  test "an init/1 that raises fails the load", %{store: store} do
    defmodule BadInit do
      @behaviour Kuma.Aggregate
      def init(_id), do: raise("no init today")
      def apply(state, _event), do: state
    end

    assert {:error, {:init_failed, 0, message}} = Loader.load(store, BadInit, "e")
    assert message =~ "no init today"
  end

  test "an erased entity does not load", %{store: store} do
    deposits(store, "f", 3)
    {:ok, _} = Kuma.delete(store, "f")
    assert {:error, :entity_erased} = Loader.load(store, Account, "f")
  end
end
