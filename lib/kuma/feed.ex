defmodule Kuma.Feed do
  @moduledoc false
  # One per store. Shard writer threads tell it of every commit ({:kuma_commit, shard, pos},
  # sent by the NIF after the transaction committed); it forwards that to every process that
  # follows the store (projections, subscriptions), which then read the new events from
  # storage. Nothing polls: a follower that has caught up sleeps until the next commit.
  use GenServer

  alias Kuma.{Native, Store}

  def child_spec(name), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [name]}}

  def start_link(name), do: GenServer.start_link(__MODULE__, name, name: Store.via(name, :feed))

  @doc """
  Makes the caller a follower of the store: from now on it receives
  `{:kuma_commit, store_name, shard, last_pos}`. Returns the last committed position of
  every shard, read after registering, so no commit falls between the two.
  """
  @spec follow(Store.t()) :: Kuma.Position.t()
  def follow(%Store{} = s) do
    {:ok, _} = Registry.register(Kuma.Listeners, {s.name, :commits}, nil)
    heads(s)
  end

  @doc "The last committed position of every shard."
  @spec heads(Store.t()) :: Kuma.Position.t()
  def heads(%Store{native: native}) do
    native |> Native.store_commit_positions() |> Enum.with_index() |> Map.new(fn {pos, shard} -> {shard, pos} end)
  end

  @impl true
  def init(name) do
    Process.flag(:trap_exit, true)
    {:ok, s} = Store.lookup(name)
    Native.store_follow_commits(s.native, self())
    {:ok, s}
  end

  @impl true
  def handle_info({:kuma_commit, shard, pos}, s) do
    message = {:kuma_commit, s.name, shard, pos}

    Registry.dispatch(Kuma.Listeners, {s.name, :commits}, fn followers ->
      for {pid, _} <- followers, do: send(pid, message)
    end)

    {:noreply, s}
  end

  def handle_info(_other, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s) do
    Native.store_follow_commits(s.native, nil)
    :ok
  end
end
