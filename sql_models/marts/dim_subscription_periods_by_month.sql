-- Each customer's subscription periods inside a month, with the plan version in force at each period's start.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, period_start]
group: billing
*/
with subscriptions as (
    select * from stg_seeds__subscriptions
),

customers as (
    select * from stg_seeds__customers
),

plans as (
    select * from stg_seeds__plans
),

currencies as (
    select * from stg_seeds__currencies
),

-- a subscription clipped to the month: [period_start, period_end)
periods as (
    select
        customer_id,
        plan_id,
        greatest(start_date, $start_date::date) as period_start,
        least(coalesce(end_date, $end_date::date), $end_date::date) as period_end
    from subscriptions
    where start_date < $end_date::date
        and coalesce(end_date, $end_date::date) > $start_date::date
),

versioned as (
    select
        periods.customer_id,
        periods.period_start,
        periods.period_end,
        plans.plan_id,
        plans.plan_version,
        plans.plan_name,
        plans.currency,
        plans.base_fee,
        plans.minimum_charge,
        plans.discount_percent,
        plans.risk_multiplier
    from periods
    inner join plans
        on periods.plan_id = plans.plan_id
        and plans.effective_from <= periods.period_start
    qualify row_number() over (
        partition by periods.customer_id, periods.period_start
        order by plans.effective_from desc, plans.plan_version desc
    ) = 1
),

final as (
    select
        $start_date::date as month,
        versioned.customer_id,
        customers.customer_name,
        versioned.period_start,
        versioned.period_end,
        date_diff('day', versioned.period_start, versioned.period_end)::bigint as period_days,
        date_diff('day', $start_date::date, $end_date::date)::bigint as month_days,
        ($end_ms - $start_ms)::bigint as month_ms,
        versioned.plan_id,
        versioned.plan_version,
        versioned.plan_name,
        versioned.currency,
        versioned.base_fee,
        versioned.minimum_charge,
        versioned.discount_percent,
        versioned.risk_multiplier,
        currencies.minor_unit_exponent,
        cast(pow(10, currencies.minor_unit_exponent) as bigint) as minor_per_major,
        -- the plan the invoice is headed with: the last period of the month
        row_number() over (partition by versioned.customer_id order by versioned.period_start desc) = 1
            as is_invoice_plan
    from versioned
    inner join customers
        on versioned.customer_id = customers.customer_id
    inner join currencies
        on versioned.currency = currencies.currency
)

select * from final
