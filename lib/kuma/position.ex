defmodule Kuma.Position do
  @moduledoc """
  Where a reader is in a store: one position per shard.

  Every shard numbers its events 1, 2, 3, ... in commit order (see docs/storage-format.md),
  and an event becomes visible only after every event before it in its shard. There is no
  order across shards (events of different entities are independent), so a place in the
  whole store is a map `%{shard => position}`: "everything up to here, in each shard". A
  missing shard counts as 0.

  Appends with `return: :token` give such a map for the events they wrote (a *position
  token*); `Kuma.Projection.wait_for/3` waits until a projection has handled everything up
  to it (read-your-writes), and `Kuma.query/2` takes one as `:after` to page.

      iex> a = %{0 => 10, 3 => 7}
      iex> Kuma.Position.merge(a, %{0 => 4, 1 => 2})
      %{0 => 10, 1 => 2, 3 => 7}
      iex> Kuma.Position.covers?(a, %{0 => 9})
      true
      iex> Kuma.Position.covers?(a, %{1 => 1})
      false
  """

  @type t :: %{optional(non_neg_integer()) => non_neg_integer()}

  @doc "The position of an envelope, or of the last of a list of envelopes in each shard."
  @spec of(Kuma.Envelope.t() | [Kuma.Envelope.t()]) :: t()
  def of(%Kuma.Envelope{shard: shard, position: position}), do: %{shard => position}
  def of(envelopes) when is_list(envelopes), do: Enum.reduce(envelopes, %{}, &merge(of(&1), &2))

  @doc "The later of two positions, shard by shard."
  @spec merge(t(), t()) :: t()
  def merge(a, b), do: Map.merge(a, b, fn _shard, x, y -> max(x, y) end)

  @doc "Whether `position` is at or past `token` in every shard."
  @spec covers?(t(), t()) :: boolean()
  def covers?(position, token), do: Enum.all?(token, fn {shard, pos} -> Map.get(position, shard, 0) >= pos end)

  @doc "How many positions `position` is behind `heads`, summed over shards."
  @spec behind(t(), t()) :: non_neg_integer()
  def behind(position, heads) do
    Enum.reduce(heads, 0, fn {shard, head}, acc -> acc + max(head - Map.get(position, shard, 0), 0) end)
  end

  @doc false
  @spec valid?(term()) :: boolean()
  def valid?(map) when is_map(map) do
    Enum.all?(map, fn {s, p} -> is_integer(s) and s >= 0 and is_integer(p) and p >= 0 end)
  end

  def valid?(_other), do: false
end
