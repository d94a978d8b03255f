-- Anomaly flags per customer, meter, rule and UTC day: value, threshold crossed and severity (rules in seeds/anomaly_rules.csv).
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, customer_id, meter_id, rule]
lookback_days: 35
group: quality
*/
with daily as (
    select * from fct_usage_by_day
    where day >= $lookback_start_date::date and day < $end_date::date
),

edges as (
    select * from fct_series_edges_by_day
    where day >= $start_date::date and day < $end_date::date
),

series as (
    select * from dim_series
),

rules as (
    select * from stg_seeds__anomaly_rules
),

meters as (
    select * from stg_seeds__meters
),

subscriptions as (
    select * from stg_seeds__subscriptions
),

plans as (
    select * from stg_seeds__plans
),

prices as (
    select * from stg_seeds__prices
),

units as (
    select * from stg_seeds__units
),

today as (
    select * from daily
    where day >= $start_date::date
),

-- a meter's own rule rows win over the rows for every meter ('')
meter_rules as (
    select meters.meter_id, rules.*
    from meters
    cross join rules
    where rules.rule_meter_id = meters.meter_id
        or (
            rules.rule_meter_id = ''
            and not exists (
                select 1 from rules as own
                where own.rule = rules.rule and own.rule_meter_id = meters.meter_id
            )
        )
),

pool_shares as (
    select * from stg_external__pool_shares
    where day >= $start_date::date and day < $end_date::date
),

-- seed 000 rate limiting: the raw samples of the day, only for series of meters with a rate rule
rate_series as (
    select series.series_id, series.customer_id, series.meter_id
    from series
    where series.customer_id is not null
        and series.meter_id in (select meter_id from meter_rules where rule = 'rate_per_minute')
),

rate_samples as (
    select series_id, ts_ms, value
    from stg_raw__samples
    where ts_ms >= $start_ms and ts_ms < $end_ms
        and isfinite(value)
        and series_id in (select series_id from rate_series)
),

rates as (
    select
        series_id,
        max(
            case when prev_ts_ms is not null and ts_ms > prev_ts_ms and ts_ms - prev_ts_ms <= $staleness_ms
                then (case when value >= prev_value then value - prev_value else value end) * 60000 / (ts_ms - prev_ts_ms)
            end
        ) as max_per_minute
    from (
        select series_id, ts_ms, value,
            lag(value) over by_time as prev_value,
            lag(ts_ms) over by_time as prev_ts_ms
        from rate_samples
        window by_time as (partition by series_id order by ts_ms)
    )
    group by series_id
),

-- seed 000: usage of the last 7 days against the 7 before
week_over_week as (
    select
        customer_id,
        meter_id,
        'week_over_week' as rule,
        sum(usage) filter (where day > $start_date::date - interval 7 day) as this_week,
        sum(usage) filter (
            where day <= $start_date::date - interval 7 day and day > $start_date::date - interval 14 day
        ) as last_week
    from daily
    where kind = 'counter'
    group by customer_id, meter_id
),

-- a robust outlier against the customer's own previous 30 days: |x - median| / (1.4826 x MAD)
baseline as (
    select customer_id, meter_id, median(usage) as median_usage, count(*) as baseline_days
    from daily
    where kind = 'counter' and day < $start_date::date and day >= $start_date::date - interval 30 day
    group by customer_id, meter_id
),

deviation as (
    select baseline.customer_id, baseline.meter_id, median(abs(daily.usage - baseline.median_usage)) as mad
    from daily
    inner join baseline
        on daily.customer_id = baseline.customer_id and daily.meter_id = baseline.meter_id
    where daily.day < $start_date::date and daily.day >= $start_date::date - interval 30 day
    group by baseline.customer_id, baseline.meter_id
),

-- seed 001: month-to-date usage against the included allowance of the plan in force today
plan_today as (
    select subscriptions.customer_id, plans.plan_id, plans.plan_version
    from subscriptions
    inner join plans
        on subscriptions.plan_id = plans.plan_id
        and plans.effective_from <= greatest(subscriptions.start_date, date_trunc('month', $start_date::date))
    where subscriptions.start_date <= $start_date::date
        and coalesce(subscriptions.end_date, $end_date::date) > $start_date::date
    qualify row_number() over (
        partition by subscriptions.customer_id order by plans.effective_from desc, plans.plan_version desc
    ) = 1
),

allowances as (
    select
        plan_today.customer_id,
        prices.meter_id,
        prices.included_quantity * units.divisor as included_base
    from plan_today
    inner join prices
        on plan_today.plan_id = prices.plan_id and plan_today.plan_version = prices.plan_version
    inner join meters
        on prices.meter_id = meters.meter_id
    inner join units
        on meters.unit = units.unit and meters.billing_unit = units.billing_unit
    where prices.included_quantity > 0 and prices.dimension = '' and meters.aggregation = 'sum'
),

month_to_date as (
    select customer_id, meter_id, sum(usage) as usage
    from daily
    where day >= date_trunc('month', $start_date::date)
    group by customer_id, meter_id
),

-- usage in a dimension (e.g. an LLM model) of a meter the plan in force prices per dimension, that no
-- price row covers: it is not billed, never priced at zero silently
unpriced as (
    select
        today.customer_id,
        today.meter_id,
        count(*) as dimensions,
        string_agg(
            coalesce(nullif(today.dimension, ''), '(none)') || ' (' || fmt_decimal(coalesce(today.usage, today.gauge_peak)) || ')',
            ', ' order by today.dimension
        ) as detail
    from today
    inner join plan_today
        on today.customer_id = plan_today.customer_id
    where exists (
        select 1 from prices
        where prices.plan_id = plan_today.plan_id and prices.plan_version = plan_today.plan_version
            and prices.meter_id = today.meter_id
    )
    and not exists (
        select 1 from prices
        where prices.plan_id = plan_today.plan_id and prices.plan_version = plan_today.plan_version
            and prices.meter_id = today.meter_id and (prices.dimension = '' or prices.dimension = today.dimension)
    )
    group by today.customer_id, today.meter_id
),

-- usage on a day no subscription of the customer covers (before it starts, after it ends, or none
-- at all) is on no invoice; it would change money when a plan prices the meter: one of the
-- customer's plans, or any plan for a customer with no subscription
uncovered as (
    select
        today.customer_id,
        today.meter_id,
        sum(coalesce(today.usage, today.gauge_peak)) as quantity
    from today
    where coalesce(today.usage, today.gauge_peak) > 0
        and not exists (
            select 1 from subscriptions
            where subscriptions.customer_id = today.customer_id
                and subscriptions.start_date <= $start_date::date
                and coalesce(subscriptions.end_date, $end_date::date) > $start_date::date
        )
    group by today.customer_id, today.meter_id
),

uncovered_context as (
    select
        uncovered.customer_id,
        uncovered.meter_id,
        uncovered.quantity,
        exists (
            select 1 from prices
            inner join subscriptions
                on prices.plan_id = subscriptions.plan_id
            where prices.meter_id = uncovered.meter_id and subscriptions.customer_id = uncovered.customer_id
        ) or (
            exists (select 1 from prices where prices.meter_id = uncovered.meter_id)
            and not exists (select 1 from subscriptions where subscriptions.customer_id = uncovered.customer_id)
        ) as priced,
        (
            select arg_max(subscriptions.plan_id || ' ended ' || subscriptions.end_date, subscriptions.end_date)
            from subscriptions
            where subscriptions.customer_id = uncovered.customer_id and subscriptions.end_date <= $start_date::date
        ) as ended,
        (
            select arg_min(subscriptions.plan_id || ' starting ' || subscriptions.start_date, subscriptions.start_date)
            from subscriptions
            where subscriptions.customer_id = uncovered.customer_id and subscriptions.start_date > $start_date::date
        ) as starting
    from uncovered
),

unmatched as (
    select
        series.meter_id,
        count(distinct series.series_id) as unmatched_series,
        string_agg(distinct series.customer_label || '=' || coalesce(series.customer_label_value, '(missing)'), ', ') as labels
    from edges
    inner join series
        on edges.series_id = series.series_id
    where series.meter_id is not null and series.customer_id is null
    group by series.meter_id
),

gaps as (
    select series.customer_id, series.meter_id, max(edges.max_gap_ms) as max_gap_ms
    from edges
    inner join series
        on edges.series_id = series.series_id
    where series.customer_id is not null
    group by series.customer_id, series.meter_id
),

candidates as (
    select customer_id, meter_id, rule, (this_week / last_week)::decimal(38, 9) as value,
        'usage ' || fmt_decimal(this_week) || ' in the last 7 days vs ' || fmt_decimal(last_week) || ' the 7 before' as detail
    from week_over_week
    where last_week > 0
    union all
    select today.customer_id, today.meter_id, 'outlier_mad',
        (abs(today.usage - baseline.median_usage) / (1.4826 * deviation.mad))::decimal(38, 9),
        'usage ' || fmt_decimal(today.usage) || ' vs 30-day median ' || fmt_decimal(baseline.median_usage)
            || ' (MAD ' || fmt_decimal(deviation.mad) || ', ' || baseline.baseline_days || ' days)'
    from today
    inner join baseline on today.customer_id = baseline.customer_id and today.meter_id = baseline.meter_id
    inner join deviation on today.customer_id = deviation.customer_id and today.meter_id = deviation.meter_id
    where today.kind = 'counter' and baseline.baseline_days >= 7 and deviation.mad > 0
    union all
    select allowances.customer_id, allowances.meter_id, 'allowance_used',
        (month_to_date.usage * 100 / allowances.included_base)::decimal(38, 9),
        fmt_decimal(month_to_date.usage) || ' used this month of ' || fmt_decimal(allowances.included_base) || ' included (base units)'
    from allowances
    inner join month_to_date
        on allowances.customer_id = month_to_date.customer_id and allowances.meter_id = month_to_date.meter_id
    union all
    select customer_id, meter_id, 'scrape_gap', max_gap_ms::decimal(38, 9),
        'longest gap between two samples: ' || (max_gap_ms // 60000) || ' min'
    from gaps
    union all
    select customer_id, meter_id, 'counter_resets', resets::decimal(38, 9), resets || ' counter resets'
    from today
    where kind = 'counter'
    union all
    select customer_id, meter_id, 'reappeared_series', reappeared_series::decimal(38, 9),
        reappeared_series || ' series back after more than 35 days; their first value was not billed'
    from today
    union all
    select customer_id, meter_id, 'dropped_samples', dropped_samples::decimal(38, 9),
        dropped_samples || ' NaN or staleness samples dropped'
    from today
    union all
    select customer_id, meter_id, 'duplicate_conflicts', duplicate_conflicts::decimal(38, 9),
        duplicate_conflicts || ' timestamps of a series with different values (the larger was billed)'
    from today
    union all
    -- a level meter's day is billed from the time some level holds: report the rest as uncovered
    select customer_id, meter_id, 'low_coverage',
        from_nano(div_half_up((($end_ms - $start_ms) - gauge_held_ms)::hugeint * 100000000000, $end_ms - $start_ms)),
        'a level held ' || (gauge_held_ms // 60000) || ' of ' || (($end_ms - $start_ms) // 60000) || ' min'
    from today
    where kind = 'gauge'
    union all
    select rate_series.customer_id, rate_series.meter_id, 'rate_per_minute',
        max(rates.max_per_minute)::decimal(38, 9),
        'highest rate between two scrapes: ' || round(max(rates.max_per_minute), 1) || ' per minute'
    from rates
    inner join rate_series on rates.series_id = rate_series.series_id
    where rates.max_per_minute is not null
    group by rate_series.customer_id, rate_series.meter_id
    union all
    select today.customer_id, today.meter_id, 'pool_share_mismatch',
        (abs(today.usage - pool_shares.pool_accepted_shares) * 100 / pool_shares.pool_accepted_shares)::decimal(38, 9),
        'proxy counted ' || fmt_decimal(today.usage) || ', the pool reported ' || fmt_decimal(pool_shares.pool_accepted_shares)
    from today
    inner join pool_shares on today.customer_id = pool_shares.customer_id
    where today.kind = 'counter' and pool_shares.pool_accepted_shares > 0
    union all
    select customer_id, meter_id, 'unpriced_usage', dimensions::decimal(38, 9),
        'usage no price row of the plan covers (not billed): ' || detail
    from unpriced
    union all
    select customer_id, meter_id,
        case when priced then 'outside_subscription' else 'outside_subscription_unpriced' end,
        quantity::decimal(38, 9),
        fmt_decimal(quantity) || ' used (base units) '
            || case
                when ended is not null and starting is not null
                    then 'between the subscription to ' || ended || ' and the one to ' || starting
                when ended is not null then 'after the subscription to ' || ended
                when starting is not null then 'before the subscription to ' || starting
                else 'with no subscription'
            end
            || ': on no invoice'
    from uncovered_context
    union all
    select '' as customer_id, meter_id, 'unmatched_series', unmatched_series::decimal(38, 9),
        unmatched_series || ' series billed to nobody: ' || labels
    from unmatched
),

crossed as (
    select
        candidates.*,
        meter_rules.threshold,
        meter_rules.severity,
        meter_rules.rule_description
    from candidates
    inner join meter_rules
        on candidates.meter_id = meter_rules.meter_id
        and candidates.rule = meter_rules.rule
    where case when candidates.rule = 'allowance_used'
        then candidates.value >= meter_rules.threshold
        else candidates.value > meter_rules.threshold
    end
    -- report the highest threshold crossed (80% and 100% of an allowance are two levels)
    qualify row_number() over (
        partition by candidates.customer_id, candidates.meter_id, candidates.rule order by meter_rules.threshold desc
    ) = 1
),

final as (
    select
        $start_date::date as day,
        customer_id,
        meter_id,
        rule,
        value,
        threshold,
        severity,
        rule_description,
        detail
    from crossed
)

select * from final
