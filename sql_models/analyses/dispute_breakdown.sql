-- Dispute evidence: every raw sample of one customer's series in a month, with the exact increase it adds.
-- Parameters: $customer_id, $meter_id ('' = all), $start_ms, $end_ms (the month), $edge_lookback_ms (fct_usage_by_day's lookback_days). Same rules as fct_usage_by_day: the pair
-- straddling a boundary belongs to the later sample; a new series counts its first value; a
-- series seen again after more than the lookback is flagged and its first value not counted.
with series as (
    select * from dim_series
    where customer_id = $customer_id
        and ($meter_id = '' or meter_id = $meter_id)
),

raw_samples as (
    select * from stg_raw__samples
    where ts_ms >= $start_ms - $edge_lookback_ms and ts_ms < $end_ms
),

-- the carry-in of the month's days (each series' last sample before a pulled day, where a pull
-- recorded one): the usage model takes it as a previous sample, never as usage of its own day
carry_in as (
    select * from stg_raw__carry_in
    where ts_ms >= $start_ms - $edge_lookback_ms and ts_ms < $end_ms
),

-- one sample per (series, timestamp): the larger value, as in the usage models (a raw sample before
-- a carried-in copy of it)
samples as (
    select
        series_id,
        ts_ms,
        value,
        carried
    from (
        select
            series_id,
            ts_ms,
            value,
            false as carried
        from raw_samples
        union all
        select
            series_id,
            ts_ms,
            value,
            true as carried
        from carry_in
    ) as candidates
    where series_id in (select series.series_id from series) and isfinite(value)
    qualify row_number() over (partition by series_id, ts_ms order by value desc, carried asc) = 1
),

ordered as (
    select
        series_id,
        ts_ms,
        value,
        lag(value) over by_time as prev_value,
        lag(ts_ms) over by_time as prev_ts_ms,
        carried
    from samples
    window by_time as (partition by series_id order by ts_ms)
),

classified as (
    select
        ordered.*,
        series.meter_id,
        series.dimension,
        series.kind,
        series.labels,
        -- the usage model sees a previous sample only in the 35 days of edges before the day
        ordered.prev_ts_ms >= (ordered.ts_ms // 86400000) * 86400000 - $edge_lookback_ms as has_prev,
        series.first_seen_ms < (ordered.ts_ms // 86400000) * 86400000 - $edge_lookback_ms as seen_before_lookback
    from ordered
    inner join series
        on ordered.series_id = series.series_id
    where ordered.ts_ms >= $start_ms and not ordered.carried
),

deltas as (
    select
        *,
        case
            when kind <> 'counter' then null
            when coalesce(has_prev, false) then counter_increase(value, prev_value)
            when seen_before_lookback then 0
            else exact_value(value)
        end as increase,
        coalesce(has_prev, false) and counter_reset(value, prev_value) and kind = 'counter' as is_reset,
        not coalesce(has_prev, false) and seen_before_lookback as is_reappearance,
        coalesce(ts_ms - prev_ts_ms, 0) as gap_ms
    from classified
),

final as (
    select
        meter_id,
        dimension,
        series_id,
        labels,
        kind,
        ts_ms,
        make_timestamp(ts_ms * 1000) as ts,
        value,
        prev_value,
        prev_ts_ms,
        increase,
        is_reset,
        is_reappearance,
        gap_ms
    from deltas
)

select * from final
order by meter_id, dimension, series_id, ts_ms
