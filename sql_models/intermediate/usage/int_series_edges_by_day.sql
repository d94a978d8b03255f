-- Per series and UTC day: first and last sample, exact in-day counter increase, resets, gauge integral, conflicting duplicates.
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, series_id]
# the hot path: computed by streaming the raw row groups (same output, to the unit); this SQL is
# its specification, which tests/test_fastpath.py and `make bench` compare it against
engine: python
python: billing_dags.models.fastpath:edges_by_day
*/
with samples as (
    select * from stg_raw__samples
    where ts_ms >= $start_ms and ts_ms < $end_ms
),

-- one sample per (series, ts): of different values the larger (a counter never gets a reset that
-- did not happen), each such timestamp counted as a conflict
deduplicated as (
    select
        series_id,
        ts_ms,
        max(value) as value,
        (min(value) <> max(value))::integer as conflict
    from samples
    where isfinite(value)
    group by series_id, ts_ms
),

dropped as (
    select
        series_id,
        count(*) as dropped_samples
    from samples
    where not isfinite(value)
    group by series_id
),

ordered as (
    select
        series_id,
        ts_ms,
        value,
        conflict,
        lag(value) over by_time as prev_value,
        lag(ts_ms) over by_time as prev_ts_ms,
        lead(ts_ms) over by_time as next_ts_ms
    from deduplicated
    window by_time as (partition by series_id order by ts_ms)
),

per_series as (
    select
        series_id,
        count(*) as samples,
        min(ts_ms) as first_ts_ms,
        arg_min(value, ts_ms) as first_value,
        max(ts_ms) as last_ts_ms,
        arg_max(value, ts_ms) as last_value,
        -- rule 1: v - v_prev when v >= v_prev, else v (a reset); pairs inside the day only
        coalesce(sum(
            case when prev_value is null then 0 else counter_increase(value, prev_value) end
        ), 0)::decimal(38, 9) as in_day_increase,
        count(*) filter (where prev_value is not null and counter_reset(value, prev_value)) as resets,
        exact_value(max(value)) as peak,
        -- rule 5: each sample holds until the next one, at most the staleness limit, within the day
        sum(exact_value(value) * least(coalesce(next_ts_ms, $end_ms) - ts_ms, $staleness_ms))::decimal(38, 9)
            as in_day_integral,
        sum(least(coalesce(next_ts_ms, $end_ms) - ts_ms, $staleness_ms))::bigint as in_day_covered_ms,
        coalesce(max(ts_ms - prev_ts_ms), 0)::bigint as max_gap_ms,
        sum(conflict)::bigint as duplicate_conflicts
    from ordered
    group by series_id
),

final as (
    select
        $start_date::date as day,
        coalesce(per_series.series_id, dropped.series_id) as series_id,
        coalesce(per_series.samples, 0)::bigint as samples,
        coalesce(dropped.dropped_samples, 0)::bigint as dropped_samples,
        per_series.first_ts_ms,
        per_series.first_value,
        per_series.last_ts_ms,
        per_series.last_value,
        coalesce(per_series.in_day_increase, 0)::decimal(38, 9) as in_day_increase,
        coalesce(per_series.resets, 0)::bigint as resets,
        per_series.peak,
        coalesce(per_series.in_day_integral, 0)::decimal(38, 9) as in_day_integral,
        coalesce(per_series.in_day_covered_ms, 0)::bigint as in_day_covered_ms,
        coalesce(per_series.max_gap_ms, 0)::bigint as max_gap_ms,
        coalesce(per_series.duplicate_conflicts, 0)::bigint as duplicate_conflicts
    from per_series
    full outer join dropped
        on per_series.series_id = dropped.series_id
)

select * from final
