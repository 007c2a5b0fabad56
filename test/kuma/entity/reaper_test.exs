defmodule Kuma.Entity.ReaperTest do
  # Kuma.Entity.Reaper: idle entities are passivated, reads keep them alive, the least
  # recently used go first when there are too many, and rows of crashed entities go.
  use Kuma.StoreCase, async: true

  alias Bank.Account
  alias Kuma.Entity.Reaper

  @moduletag store: false

  defp account(store, id \\ "account:alice"), do: Kuma.entity(store, Account, id)

  test "a tick is a quarter of the idle timeout, between 10 ms and 1 s" do
    assert Reaper.tick_ms(:infinity) == 1000
    assert Reaper.tick_ms(100) == 25
    assert Reaper.tick_ms(20) == 10
    assert Reaper.tick_ms(:timer.minutes(15)) == 1000
  end

  test "idle entities stop and come back with their state", %{dir: dir, name: name} do
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, aggregates: [Account], idle_timeout: 100)
    alice = account(store)
    {:ok, 1} = Kuma.execute(alice, {:deposit, 42})
    {:ok, %{live: true, pid: pid}} = Kuma.entity_info(alice)
    ref = Process.monitor(pid)
    assert_receive {:DOWN, ^ref, :process, ^pid, {:shutdown, :passivated}}, 2_000
    assert {:ok, %{live: false}} = Kuma.entity_info(alice)
    assert %Account{balance: 42} = Kuma.read(alice)
    assert {:ok, 2} = Kuma.execute(alice, {:deposit, 1})
  end

  test "reads keep an entity alive", %{dir: dir, name: name} do
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, aggregates: [Account], idle_timeout: 200)
    alice = account(store)
    {:ok, 1} = Kuma.execute(alice, {:deposit, 1})
    {:ok, %{pid: pid}} = Kuma.entity_info(alice)

    for _ <- 1..20 do
      Process.sleep(30)
      %Account{} = Kuma.read(alice)
    end

    assert Process.alive?(pid)
  end

  test "max_live_entities passivates the least recently used", %{dir: dir, name: name} do
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, aggregates: [Account], max_live_entities: 5)

    for i <- 1..12 do
      {:ok, 1} = Kuma.execute(account(store, "account:#{i}"), {:deposit, i})
      # Distinct epochs, so "least recently used" is well defined.
      Process.sleep(if i == 6, do: 1_100, else: 0)
    end

    live = fn ->
      Enum.count(1..12, &match?({:ok, %{live: true}}, Kuma.entity_info(account(store, "account:#{&1}"))))
    end

    assert eventually(fn -> live.() <= 5 end)
    # The six entities used before the pause are the oldest: they went first.
    assert Enum.all?(1..6, &match?({:ok, %{live: false}}, Kuma.entity_info(account(store, "account:#{&1}"))))
    assert Enum.map(1..12, &Kuma.read(account(store, "account:#{&1}")).balance) == Enum.to_list(1..12)
  end

  test "the row of an entity process that died without cleaning up is removed", %{dir: dir, name: name} do
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 2, aggregates: [Account], max_live_entities: 1)
    for i <- 1..2, do: {:ok, 1} = Kuma.execute(account(store, "account:#{i}"), {:deposit, i})
    # A row left behind by a process that is gone (as after a brutal kill).
    dead = spawn(fn -> :ok end)
    ref = Process.monitor(dead)
    assert_receive {:DOWN, ^ref, :process, ^dead, _}
    :ets.insert(store.entities, {"account:ghost", dead, Account, %Account{}, 1, 0})
    assert eventually(fn -> :ets.lookup(store.entities, "account:ghost") == [] end)
    assert eventually(fn -> :ets.info(store.entities, :size) <= 1 end)
  end
end
