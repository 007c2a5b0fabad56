defmodule Kuma.Aggregate.Latest do
  @moduledoc """
  The aggregate of entities used without one (`Kuma.entity(store, id)`): the state is the
  most recently appended event (`nil` before the first). Useful for registers and sensors
  ("current reading"). It has no `handle/2`: write with `Kuma.append/3`.
  """
  @behaviour Kuma.Aggregate

  @impl true
  def init(_id), do: nil

  @impl true
  def apply(_state, event), do: event
end
